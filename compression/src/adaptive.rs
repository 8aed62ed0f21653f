//! When zstd pays on a link: a sender compresses a payload only if that gets it across
//! sooner.
//!
//! Compressing `n` bytes takes `n / speed` seconds and saves `n (1 - ratio)` bytes, which
//! take `n (1 - ratio) / link` seconds to send; so zstd pays when
//! `link < speed * (1 - ratio)`, whatever `n`. Float updates compress little (fp32
//! gradients by about a tenth), so a home uplink of a few MB/s gains from zstd while
//! loopback or a LAN only waits for it. (The receiver's decompression, several times faster
//! than compression, is left out.) This is the trade-off zstd's own `--adapt` mode makes
//! from its output's back-pressure.
//!
//! [`ZstdPolicy`] learns `speed` and `ratio` from the payloads it compressed. It compresses
//! while either is unknown, and one payload in [`REPROBE_EVERY`] + 1 even when sending raw,
//! to follow data that compresses better or worse as training goes on. The choice is
//! lossless and per payload: the payload's header says whether its body is compressed, and
//! a decoder reads both (see [`compress_payload`](crate::compress_payload)).

use std::time::{Duration, Instant};

use crate::{CodecConfig, CodecError};

/// Raw payloads sent in a row before one is compressed again to re-measure.
pub const REPROBE_EVERY: u32 = 16;

/// Weight of the newest measurement in the running estimates (an exponential moving
/// average, so one payload timed across a preemption does not flip the choice).
const NEWEST_WEIGHT: f64 = 0.5;

/// Chooses, payload by payload, between the run's zstd level and no zstd (see the
/// [module docs](self)).
#[derive(Clone, Debug, PartialEq)]
pub struct ZstdPolicy {
    level: i32,
    adaptive: bool,
    /// Uncompressed bytes zstd takes in per second.
    speed: Option<f64>,
    /// Compressed over uncompressed bytes.
    ratio: f64,
    raw_in_a_row: u32,
}

impl ZstdPolicy {
    /// A policy for `cfg.zstd_level` (0: zstd off, and [`choose`](Self::choose) always
    /// says 0); with `cfg.zstd_adaptive` off, `choose` always says that level.
    pub fn new(cfg: &CodecConfig) -> Self {
        ZstdPolicy {
            level: cfg.zstd_level,
            adaptive: cfg.zstd_adaptive,
            speed: None,
            ratio: 1.0,
            raw_in_a_row: 0,
        }
    }

    /// The zstd level for the next payload over a link that carries `link` bytes a second
    /// (`None`: unknown): the configured level, or 0 to send it raw.
    pub fn choose(&mut self, link: Option<f64>) -> i32 {
        if self.level <= 0 || !self.adaptive {
            return self.level.max(0);
        }
        let pays = match (self.speed, link) {
            (Some(speed), Some(link)) => link < speed * (1.0 - self.ratio),
            _ => true,
        };
        if pays || self.raw_in_a_row >= REPROBE_EVERY {
            self.raw_in_a_row = 0;
            self.level
        } else {
            self.raw_in_a_row += 1;
            0
        }
    }

    /// `raw` compressed by `compress` at the level [`Self::choose`] picks for `link`, the
    /// compression measured ([`Self::observe`]); `None` when the payload goes raw.
    ///
    /// # Errors
    /// What `compress` returns.
    pub fn compress_if_it_pays(
        &mut self,
        raw: &[u8],
        link: Option<f64>,
        compress: impl FnOnce(&[u8], i32) -> Result<Vec<u8>, CodecError>,
    ) -> Result<Option<Vec<u8>>, CodecError> {
        let level = self.choose(link);
        if level == 0 {
            return Ok(None);
        }
        let t = Instant::now();
        let z = compress(raw, level)?;
        self.observe(raw.len(), z.len(), t.elapsed());
        Ok(Some(z))
    }

    /// Records one compression: `raw` bytes in, `compressed` out, in `took`.
    pub fn observe(&mut self, raw: usize, compressed: usize, took: Duration) {
        if raw == 0 {
            return;
        }
        let speed = raw as f64 / took.as_secs_f64().max(1e-7);
        let ratio = compressed as f64 / raw as f64;
        let blend = |old: f64, new: f64| old + NEWEST_WEIGHT * (new - old);
        match self.speed {
            None => {
                self.speed = Some(speed);
                self.ratio = ratio;
            }
            Some(s) => {
                self.speed = Some(blend(s, speed));
                self.ratio = blend(self.ratio, ratio);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn level(zstd_level: i32) -> ZstdPolicy {
        ZstdPolicy::new(&CodecConfig {
            zstd_level,
            ..CodecConfig::default()
        })
    }

    #[test]
    fn compresses_until_it_has_measured_and_whenever_the_link_is_unknown() {
        let mut p = level(3);
        assert_eq!(p.choose(Some(1e12)), 3);
        // 1 MB in 1 ms (1 GB/s), to 900 kB: pays below 100 MB/s.
        p.observe(1_000_000, 900_000, MS);
        assert_eq!(p.choose(None), 3);
        assert_eq!(p.choose(Some(50e6)), 3);
        assert_eq!(p.choose(Some(200e6)), 0);
    }

    #[test]
    fn a_fast_link_sends_raw_but_re_measures_now_and_then() {
        let mut p = level(1);
        p.observe(1_000_000, 900_000, MS);
        let picks: Vec<i32> = (0..2 * (REPROBE_EVERY + 1))
            .map(|_| p.choose(Some(1e10)))
            .collect();
        let probes: Vec<usize> = (0..picks.len()).filter(|&i| picks[i] > 0).collect();
        assert_eq!(
            probes,
            vec![REPROBE_EVERY as usize, 2 * REPROBE_EVERY as usize + 1]
        );
    }

    #[test]
    fn estimates_follow_the_data_zstd_off_stays_off_and_not_adaptive_always_compresses() {
        let mut p = level(1);
        p.observe(1_000_000, 990_000, MS);
        assert_eq!(p.choose(Some(50e6)), 0);
        // The data now halves under zstd: the running ratio falls below 1/2 after a few.
        for _ in 0..4 {
            p.observe(1_000_000, 400_000, MS);
        }
        assert_eq!(p.choose(Some(50e6)), 1);
        let mut off = level(0);
        assert_eq!(off.choose(None), 0);
        assert_eq!(off.choose(Some(1.0)), 0);
        let mut always = ZstdPolicy::new(&CodecConfig {
            zstd_level: 2,
            zstd_adaptive: false,
            ..CodecConfig::default()
        });
        always.observe(1_000_000, 999_999, MS);
        assert!((0..40).all(|_| always.choose(Some(1e12)) == 2));
    }
}
