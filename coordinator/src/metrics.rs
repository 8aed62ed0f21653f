//! `metrics.jsonl`: one JSON object a line, appended and flushed as events happen, plus
//! the traffic counters shared by the connection tasks.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Result;
use serde_json::{json, Value};

use crate::monitor::status::Digest;

/// Application-level bytes (frames) moved by one connection, or by all of them.
#[derive(Debug, Default)]
pub struct Traffic {
    /// Bytes received.
    pub bytes_in: AtomicU64,
    /// Bytes sent.
    pub bytes_out: AtomicU64,
    /// Bytes of data files sent on data streams (not in `bytes_out`).
    pub data_out: AtomicU64,
    /// What the connection can send, bytes a second, as `f64` bits (0: unknown; one
    /// connection's own counters only).
    send_rate: AtomicU64,
}

impl Traffic {
    /// Counts `n` received bytes.
    pub fn add_in(&self, n: u64) {
        self.bytes_in.fetch_add(n, Ordering::Relaxed);
    }
    /// Counts `n` sent bytes.
    pub fn add_out(&self, n: u64) {
        self.bytes_out.fetch_add(n, Ordering::Relaxed);
    }
    /// Counts `n` bytes of data files sent.
    pub fn add_data(&self, n: u64) {
        self.data_out.fetch_add(n, Ordering::Relaxed);
    }
    /// Bytes of data files sent.
    pub fn data(&self) -> u64 {
        self.data_out.load(Ordering::Relaxed)
    }
    /// Records what the connection can send now ([`proto::tls::send_rate`]).
    pub fn set_send_rate(&self, rate: Option<f64>) {
        let bits = rate
            .filter(|r| r.is_finite() && *r > 0.0)
            .map_or(0, f64::to_bits);
        self.send_rate.store(bits, Ordering::Relaxed);
    }
    /// What the connection could send when last measured, bytes a second (`None`: unknown).
    pub fn send_rate(&self) -> Option<f64> {
        let bits = self.send_rate.load(Ordering::Relaxed);
        (bits != 0).then(|| f64::from_bits(bits))
    }
    /// (received, sent).
    pub fn get(&self) -> (u64, u64) {
        (
            self.bytes_in.load(Ordering::Relaxed),
            self.bytes_out.load(Ordering::Relaxed),
        )
    }
}

/// Reads `metrics.jsonl` once: the length of its whole lines (a crash can leave a torn last
/// one) and the step of its last `step` event; each event goes into `digest`.
fn scan(file: &File, digest: &mut Digest) -> Result<(u64, Option<u64>)> {
    let mut reader = BufReader::new(file);
    let (mut whole, mut last, mut line) = (0u64, None, Vec::new());
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line)?;
        if n == 0 || line.last() != Some(&b'\n') {
            return Ok((whole, last));
        }
        whole += n as u64;
        if let Ok(v) = serde_json::from_slice::<Value>(&line) {
            if v["event"] == "step" {
                last = v["step"].as_u64().or(last);
            }
            digest.add(&v);
        }
    }
}

/// Appends events to `metrics.jsonl`.
pub struct Metrics {
    file: File,
    start: std::time::Instant,
    wall_offset: f64,
    /// What the events so far (earlier sessions' included) say, for the status server.
    pub digest: Digest,
}

impl Metrics {
    /// Opens (appending) `dir/metrics.jsonl`; `wall_offset` is the wall time of earlier sessions.
    /// A line torn by a crash at the end of the file is cut off, so that the next event
    /// starts a line of its own. Also returns the step of the last `step` event there: a
    /// round can be in the write-ahead log but not yet reported when the coordinator is
    /// killed, and this tells a restart which to report.
    pub fn open(dir: &Path, wall_offset: f64) -> Result<(Self, Option<u64>)> {
        let file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(dir.join("metrics.jsonl"))?;
        let mut digest = Digest::default();
        let (whole, last_step) = scan(&file, &mut digest)?;
        if whole < file.metadata()?.len() {
            tracing::warn!("metrics.jsonl: cutting off a torn last line");
            file.set_len(whole)?;
        }
        let metrics = Metrics {
            file,
            start: std::time::Instant::now(),
            wall_offset,
            digest,
        };
        Ok((metrics, last_step))
    }

    /// Wall seconds of the run so far, earlier sessions included.
    pub fn wall_s(&self) -> f64 {
        self.wall_offset + self.start.elapsed().as_secs_f64()
    }

    /// Writes one event; `fields` must be a JSON object, to which `event` and `wall_s` are added.
    pub fn emit(&mut self, event: &str, fields: Value) {
        let mut obj = match fields {
            Value::Object(m) => m,
            _ => serde_json::Map::new(),
        };
        obj.insert("event".into(), json!(event));
        obj.insert(
            "wall_s".into(),
            json!((self.wall_s() * 1000.0).round() / 1000.0),
        );
        let v = Value::Object(obj);
        self.digest.add(&v);
        // One write for the line and its newline: a kill cannot leave the event without it.
        let line = v.to_string() + "\n";
        if let Err(e) = self
            .file
            .write_all(line.as_bytes())
            .and_then(|_| self.file.flush())
        {
            tracing::error!("cannot write metrics.jsonl: {e}");
        }
    }
}

/// CPU seconds (user + system) this process has used since it started (`getrusage(2)`,
/// `RUSAGE_SELF`: every thread, the checkers included); NaN if the call fails.
pub fn process_cpu_s() -> f64 {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes a `rusage` into the buffer it is given, which is large enough.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr()) } != 0 {
        return f64::NAN;
    }
    // SAFETY: initialised by the successful call above (and zeroed before).
    let ru = unsafe { ru.assume_init() };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    secs(ru.ru_utime) + secs(ru.ru_stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_torn_last_line_is_cut_and_the_last_step_found() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        assert_eq!(Metrics::open(dir.path(), 0.0).unwrap().1, None);
        std::fs::write(
            &path,
            "{\"event\":\"step\",\"step\":6}\n{\"event\":\"step\",\"step\":7}\n{\"event\":\"eval\",\"step\":7}\n{\"event\":\"st",
        )
        .unwrap();
        let (mut m, last) = Metrics::open(dir.path(), 0.0).unwrap();
        assert_eq!(last, Some(7));
        m.emit("step", json!({"step": 8}));
        drop(m);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 4);
        assert!(text
            .lines()
            .all(|l| serde_json::from_str::<Value>(l).is_ok()));
        assert_eq!(Metrics::open(dir.path(), 0.0).unwrap().1, Some(8));
    }

    #[test]
    fn a_file_without_a_newline_is_emptied() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("metrics.jsonl"), "{\"event\":").unwrap();
        drop(Metrics::open(dir.path(), 0.0).unwrap());
        assert_eq!(
            std::fs::read(dir.path().join("metrics.jsonl"))
                .unwrap()
                .len(),
            0
        );
    }
}
