//! What the coordinator sends so that a worker holds the current parameters: nothing when
//! it holds them already, a delta from the version it holds (lossless XOR, or the chain of
//! quantized deltas of a lossy downlink), or the full vector. Payloads are cached per
//! version, so a round encodes each distinct payload once whatever the number of workers,
//! and every task that carries it shares its bytes ([`bytes::Bytes`], reference-counted):
//! the messages queued for N workers hold one copy, not N.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use anyhow::Result;
use bytes::Bytes;
use compression::{CodecConfig, CodecError, ZstdPolicy};
use proto::ParamsPayload;
use verify::Hash;

/// Older versions kept as XOR bases.
const KEEP_VERSIONS: usize = 4;
/// Longest chain of lossy deltas sent instead of an XOR delta.
const MAX_CHAIN: usize = 8;

/// One payload, raw and zstd-compressed, each made when first needed.
#[derive(Default)]
struct Forms {
    raw: Option<Bytes>,
    zstd: Option<Bytes>,
}

impl Forms {
    /// The compressed form if made already (free to send); else the raw form, compressed
    /// first when `policy` says zstd pays on `link`.
    fn pick(
        &mut self,
        policy: &mut ZstdPolicy,
        link: Option<f64>,
        make_raw: impl FnOnce() -> Result<Vec<u8>, CodecError>,
        compress: fn(&[u8], i32) -> Result<Vec<u8>, CodecError>,
    ) -> Result<Bytes> {
        if let Some(z) = &self.zstd {
            return Ok(z.clone());
        }
        let raw = match &self.raw {
            Some(r) => r.clone(),
            None => self.raw.insert(Bytes::from(make_raw()?)).clone(),
        };
        Ok(match policy.compress_if_it_pays(&raw, link, compress)? {
            Some(z) => self.zstd.insert(Bytes::from(z)).clone(),
            None => raw,
        })
    }
}

/// The current parameters and what is needed to bring any worker to them.
pub struct Downlink {
    /// Whether a payload is worth compressing for a link (the run's level, or raw): one
    /// policy for full vectors (which zstd shrinks by about a tenth) and one for XOR deltas
    /// (about 40%), so that neither's measured ratio decides for the other.
    zstd_full: ZstdPolicy,
    zstd_xor: ZstdPolicy,
    version: u64,
    hash: Hash,
    params: Arc<Vec<f32>>,
    full: Forms,
    xor: HashMap<u64, Forms>,
    /// Earlier versions' values (newest last).
    older: VecDeque<(u64, Arc<Vec<f32>>)>,
    /// Lossy deltas: `(v, d)` turns version `v - 1` into `v` (consecutive, newest last).
    adds: VecDeque<(u64, Bytes)>,
}

impl Downlink {
    /// Starts at version 1 with `params`. Full vectors and XOR deltas are zstd-compressed at
    /// `cfg.zstd_level` for links where that pays ([`ZstdPolicy`]), else sent raw; lossy
    /// deltas come encoded (compressed) already.
    pub fn new(params: Vec<f32>, cfg: &CodecConfig) -> Self {
        Downlink {
            zstd_full: ZstdPolicy::new(cfg),
            zstd_xor: ZstdPolicy::new(cfg),
            version: 1,
            hash: verify::hash_f32(&params),
            params: Arc::new(params),
            full: Forms::default(),
            xor: HashMap::new(),
            older: VecDeque::new(),
            adds: VecDeque::new(),
        }
    }

    /// Current version number.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// blake3 of the current parameters.
    pub fn hash(&self) -> Hash {
        self.hash
    }

    /// The current parameters.
    pub fn params(&self) -> &Arc<Vec<f32>> {
        &self.params
    }

    /// Moves to new parameters. `delta` is the encoded lossy delta that produced them from
    /// the current ones (a lossy downlink), or None (lossless, or after a rollback).
    pub fn advance(&mut self, params: Vec<f32>, delta: Option<Vec<u8>>) {
        let old = std::mem::replace(&mut self.params, Arc::new(params));
        self.older.push_back((self.version, old));
        while self.older.len() > KEEP_VERSIONS {
            self.older.pop_front();
        }
        self.version += 1;
        self.hash = verify::hash_f32(&self.params);
        self.full = Forms::default();
        self.xor.clear();
        match delta {
            Some(d) => {
                self.adds.push_back((self.version, Bytes::from(d)));
                while self.adds.len() > MAX_CHAIN {
                    self.adds.pop_front();
                }
            }
            None => self.adds.clear(),
        }
    }

    /// The payload for a worker holding version `held`, over a link that carries `link`
    /// bytes a second (`None`: unknown).
    pub fn payload(&mut self, held: Option<u64>, link: Option<f64>) -> Result<ParamsPayload> {
        let Some(held) = held else {
            return self.full(link);
        };
        if held == self.version {
            return Ok(ParamsPayload::Held);
        }
        if let Some(pos) = self.adds.iter().position(|(v, _)| *v == held + 1) {
            let deltas: Vec<Bytes> = self.adds.iter().skip(pos).map(|(_, d)| d.clone()).collect();
            return Ok(ParamsPayload::Add { base: held, deltas });
        }
        let Some((_, base)) = self.older.iter().find(|(v, _)| *v == held) else {
            return self.full(link);
        };
        let params = &self.params;
        let delta = self.xor.entry(held).or_default().pick(
            &mut self.zstd_xor,
            link,
            || compression::encode_xor_delta(base, params, 0),
            compression::compress_xor_delta,
        )?;
        Ok(ParamsPayload::Xor { base: held, delta })
    }

    fn full(&mut self, link: Option<f64>) -> Result<ParamsPayload> {
        let raw = CodecConfig {
            zstd_level: 0,
            ..CodecConfig::lossless()
        };
        let params = &self.params;
        let bytes = self.full.pick(
            &mut self.zstd_full,
            link,
            || compression::encode(params, &raw, 0),
            compression::compress_payload,
        )?;
        Ok(ParamsPayload::Full(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use compression::{CodecKind, DecodeLimits};
    use executor::params::{rebuild, Held};

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// Rebuilds what a worker holding `held` gets from `d`.
    fn follow(d: &mut Downlink, held: Option<&Held>) -> Held {
        let p = d.payload(held.map(|h| h.version), None).unwrap();
        rebuild(
            held,
            &p,
            d.version(),
            &d.hash(),
            d.params().len(),
            &DecodeLimits::default(),
        )
        .unwrap()
    }

    #[test]
    fn workers_rebuild_every_version_bit_for_bit() {
        let n = 500;
        let int8 = CodecConfig {
            codec: CodecKind::Int8,
            ..Default::default()
        };
        let p0: Vec<f32> = (0..n).map(|i| (i as f32).sin()).collect();
        let mut d = Downlink::new(p0.clone(), &int8);
        let first = follow(&mut d, None);
        assert!(matches!(
            d.payload(Some(1), None).unwrap(),
            ParamsPayload::Held
        ));
        let mut lagging = first.clone();
        let mut current = first;
        let mut p = p0;
        for step in 0..12u32 {
            // A lossy step: the coordinator applies the decoded delta to its own copy.
            let delta: Vec<f32> = (0..n)
                .map(|i| ((i as u32 * 7 + step) % 13) as f32 * 1e-3)
                .collect();
            let enc = compression::encode(&delta, &int8, u64::from(step)).unwrap();
            executor::params::add_delta(&mut p, &enc, &DecodeLimits::default()).unwrap();
            d.advance(p.clone(), Some(enc));
            current = follow(&mut d, Some(&current));
            assert_eq!(bits(&current.values), bits(&p));
            if step % 3 == 2 {
                // Behind by three versions: a chain of three deltas.
                assert!(
                    matches!(d.payload(Some(lagging.version), None).unwrap(), ParamsPayload::Add { ref deltas, .. } if deltas.len() == 3)
                );
                lagging = follow(&mut d, Some(&lagging));
                assert_eq!(bits(&lagging.values), bits(&p));
            }
        }
        // A rollback breaks the chain: XOR from a kept version, or everything.
        let rolled: Vec<f32> = p.iter().map(|x| x * 0.5).collect();
        d.advance(rolled.clone(), None);
        assert!(matches!(
            d.payload(Some(current.version), None).unwrap(),
            ParamsPayload::Xor { .. }
        ));
        let after = follow(&mut d, Some(&current));
        assert_eq!(bits(&after.values), bits(&rolled));
        assert!(matches!(
            d.payload(Some(1), None).unwrap(),
            ParamsPayload::Full(_)
        ));
        assert_eq!(bits(&follow(&mut d, None).values), bits(&rolled));
    }

    /// Whether a delta's DTX1 header says its body is compressed.
    fn compressed(p: &ParamsPayload) -> bool {
        match p {
            ParamsPayload::Xor { delta, .. } => delta[5] & 1 == 1,
            ParamsPayload::Full(b) => compression::peek_header(b).unwrap().zstd,
            _ => panic!("expected an XOR delta or full parameters"),
        }
    }

    #[test]
    fn a_fast_link_gets_raw_bytes_a_slow_one_compressed_and_both_rebuild_exactly() {
        let n = 20_000;
        let p0: Vec<f32> = (0..n).map(|i| (i as f32 * 0.01).sin()).collect();
        let mut d = Downlink::new(p0.clone(), &CodecConfig::default());
        let (fast, slow) = (Some(1e15), Some(1.0));
        // Nothing measured yet: compressed, whatever the link (full vectors and deltas are
        // measured apart).
        assert!(compressed(&d.payload(None, fast).unwrap()));
        let held = follow(&mut d, None);
        d.advance(p0.iter().map(|x| x + 1e-4).collect(), None);
        assert!(compressed(&d.payload(Some(held.version), fast).unwrap()));
        let p2: Vec<f32> = p0.iter().map(|x| x - 2e-4).collect();
        d.advance(p2.clone(), None);
        let raw = d.payload(Some(held.version), fast).unwrap();
        assert!(!compressed(&raw));
        let z = d.payload(Some(held.version), slow).unwrap();
        assert!(compressed(&z));
        // Once made, the compressed form goes to every link.
        assert!(compressed(&d.payload(Some(held.version), fast).unwrap()));
        for p in [raw, z] {
            let got = rebuild(
                Some(&held),
                &p,
                d.version(),
                &d.hash(),
                n,
                &DecodeLimits::default(),
            )
            .unwrap();
            assert_eq!(bits(&got.values), bits(&p2));
        }
        // Unknown links get what pays on the slowest: compressed.
        d.advance(p0, None);
        assert!(compressed(&d.payload(Some(held.version), None).unwrap()));
    }
}
