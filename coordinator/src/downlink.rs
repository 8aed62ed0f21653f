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
use compression::CodecConfig;
use proto::ParamsPayload;
use verify::Hash;

/// Older versions kept as XOR bases.
const KEEP_VERSIONS: usize = 4;
/// Longest chain of lossy deltas sent instead of an XOR delta.
const MAX_CHAIN: usize = 8;

/// The current parameters and what is needed to bring any worker to them.
pub struct Downlink {
    zstd_level: i32,
    version: u64,
    hash: Hash,
    params: Arc<Vec<f32>>,
    full: Option<Bytes>,
    xor: HashMap<u64, Bytes>,
    /// Earlier versions' values (newest last).
    older: VecDeque<(u64, Arc<Vec<f32>>)>,
    /// Lossy deltas: `(v, d)` turns version `v - 1` into `v` (consecutive, newest last).
    adds: VecDeque<(u64, Bytes)>,
}

impl Downlink {
    /// Starts at version 1 with `params`; payloads are zstd-compressed at `cfg.zstd_level`.
    pub fn new(params: Vec<f32>, cfg: &CodecConfig) -> Self {
        Downlink {
            zstd_level: cfg.zstd_level,
            version: 1,
            hash: verify::hash_f32(&params),
            params: Arc::new(params),
            full: None,
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
        self.full = None;
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

    /// The payload for a worker holding version `held`.
    pub fn payload(&mut self, held: Option<u64>) -> Result<ParamsPayload> {
        let Some(held) = held else {
            return self.full();
        };
        if held == self.version {
            return Ok(ParamsPayload::Held);
        }
        if let Some(pos) = self.adds.iter().position(|(v, _)| *v == held + 1) {
            let deltas: Vec<Bytes> = self.adds.iter().skip(pos).map(|(_, d)| d.clone()).collect();
            return Ok(ParamsPayload::Add { base: held, deltas });
        }
        let Some((_, base)) = self.older.iter().find(|(v, _)| *v == held) else {
            return self.full();
        };
        if let Some(d) = self.xor.get(&held) {
            return Ok(ParamsPayload::Xor {
                base: held,
                delta: d.clone(),
            });
        }
        let d = Bytes::from(compression::encode_xor_delta(
            base,
            &self.params,
            self.zstd_level,
        )?);
        self.xor.insert(held, d.clone());
        Ok(ParamsPayload::Xor {
            base: held,
            delta: d,
        })
    }

    fn full(&mut self) -> Result<ParamsPayload> {
        if self.full.is_none() {
            let cfg = CodecConfig {
                zstd_level: self.zstd_level,
                ..CodecConfig::lossless()
            };
            self.full = Some(Bytes::from(compression::encode(&self.params, &cfg, 0)?));
        }
        Ok(ParamsPayload::Full(self.full.clone().unwrap_or_default()))
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
        let p = d.payload(held.map(|h| h.version)).unwrap();
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
        assert!(matches!(d.payload(Some(1)).unwrap(), ParamsPayload::Held));
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
                    matches!(d.payload(Some(lagging.version)).unwrap(), ParamsPayload::Add { ref deltas, .. } if deltas.len() == 3)
                );
                lagging = follow(&mut d, Some(&lagging));
                assert_eq!(bits(&lagging.values), bits(&p));
            }
        }
        // A rollback breaks the chain: XOR from a kept version, or everything.
        let rolled: Vec<f32> = p.iter().map(|x| x * 0.5).collect();
        d.advance(rolled.clone(), None);
        assert!(matches!(
            d.payload(Some(current.version)).unwrap(),
            ParamsPayload::Xor { .. }
        ));
        let after = follow(&mut d, Some(&current));
        assert_eq!(bits(&after.values), bits(&rolled));
        assert!(matches!(
            d.payload(Some(1)).unwrap(),
            ParamsPayload::Full(_)
        ));
        assert_eq!(bits(&follow(&mut d, None).values), bits(&rolled));
    }
}
