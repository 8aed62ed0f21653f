//! The volunteer's cap on what the worker sends (`--max-upload-mbps`): a token bucket over
//! the bytes of the control stream, so that a result never takes more than the volunteer's
//! share of a home uplink. Without a cap, frames go out as fast as QUIC sends them.

use std::time::{Duration, Instant};

use proto::FrameError;
use serde::Serialize;
use tokio::io::{AsyncWrite, AsyncWriteExt};

/// Bytes written at a time under a cap (each piece waits for its tokens).
const PIECE: usize = 16 << 10;

/// A token bucket of `rate` bytes a second holding at most a quarter second of them.
#[derive(Debug)]
pub struct Pacer {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl Pacer {
    /// A full bucket for `mbps` megabits per second.
    pub fn new(mbps: f64, now: Instant) -> Self {
        let rate = mbps * 125_000.0;
        Pacer {
            rate,
            tokens: rate / 4.0,
            at: now,
        }
    }

    /// The cap in bytes per second.
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// Takes `n` bytes' tokens at `now`; returns how long to wait before sending them.
    pub fn take(&mut self, n: usize, now: Instant) -> Duration {
        let cap = self.rate / 4.0;
        let refill = now.saturating_duration_since(self.at).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(cap) - n as f64;
        self.at = now;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

/// Writes `msg` as one frame (see [`proto::write_frame`]), paced by `pacer` when there is
/// one; returns the bytes written.
pub async fn send<W, T>(
    w: &mut W,
    msg: &T,
    cap: u64,
    pacer: Option<&mut Pacer>,
) -> Result<u64, FrameError>
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    let Some(pacer) = pacer else {
        return proto::write_frame(w, msg, cap).await;
    };
    let mut frame = Vec::new();
    let n = proto::write_frame(&mut frame, msg, cap).await?;
    for piece in frame.chunks(PIECE) {
        let wait = pacer.take(piece.len(), Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        w.write_all(piece).await?;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_capped_uplink_sends_at_its_rate_after_a_short_burst() {
        let t0 = Instant::now();
        // 8 Mbit/s = 1 MB/s: a quarter second (250 kB) goes at once.
        let mut p = Pacer::new(8.0, t0);
        assert_eq!(p.take(250_000, t0), Duration::ZERO);
        // 4 MB more, sent back to back, wait 4 s in all.
        let mut waited = Duration::ZERO;
        for _ in 0..(4_000_000 / PIECE) {
            waited += p.take(PIECE, t0 + waited);
        }
        let want = (4_000_000 / PIECE * PIECE) as f64 / 1e6;
        assert!((waited.as_secs_f64() - want).abs() < 1e-3, "{waited:?}");
        // After an idle second the burst is back, no more.
        let later = t0 + waited + Duration::from_secs(1);
        assert_eq!(p.take(250_000, later), Duration::ZERO);
        assert!(p.take(1000, later) > Duration::ZERO);
    }

    #[tokio::test]
    async fn paced_and_plain_frames_are_the_same_bytes() {
        let msg = proto::ToCoordinator::Ready;
        let (mut a, mut b) = (Vec::new(), Vec::new());
        let mut p = Pacer::new(1000.0, Instant::now());
        let na = send(&mut a, &msg, 1024, None).await.unwrap();
        let nb = send(&mut b, &msg, 1024, Some(&mut p)).await.unwrap();
        assert_eq!((a, na), (b, nb));
    }
}
