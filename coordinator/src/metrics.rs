//! `metrics.jsonl`: one JSON object a line, appended and flushed as events happen, plus
//! the traffic counters shared by the connection tasks.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Result;
use serde_json::{json, Value};

/// Application-level bytes (frames) moved by one connection, or by all of them.
#[derive(Debug, Default)]
pub struct Traffic {
    /// Bytes received.
    pub bytes_in: AtomicU64,
    /// Bytes sent.
    pub bytes_out: AtomicU64,
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
    /// (received, sent).
    pub fn get(&self) -> (u64, u64) {
        (
            self.bytes_in.load(Ordering::Relaxed),
            self.bytes_out.load(Ordering::Relaxed),
        )
    }
}

/// What every `step` line of `metrics.jsonl` contains.
const STEP_TAG: &[u8] = b"\"event\":\"step\"";

/// The offset just past the last newline of `file` (of length `len`), 0 if it has none.
fn last_line_end(mut file: &File, len: u64) -> Result<u64> {
    let mut end = len;
    let mut buf = vec![0u8; 64 * 1024];
    while end > 0 {
        let start = end.saturating_sub(buf.len() as u64);
        let chunk = &mut buf[..(end - start) as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(chunk)?;
        if let Some(i) = chunk.iter().rposition(|&b| b == b'\n') {
            return Ok(start + i as u64 + 1);
        }
        end = start;
    }
    Ok(0)
}

/// Appends events to `metrics.jsonl`.
pub struct Metrics {
    file: File,
    start: std::time::Instant,
    wall_offset: f64,
}

impl Metrics {
    /// Opens (appending) `dir/metrics.jsonl`; `wall_offset` is the wall time of earlier sessions.
    /// A line torn by a crash at the end of the file is cut off, so that the next event
    /// starts a line of its own.
    pub fn open(dir: &Path, wall_offset: f64) -> Result<Self> {
        let path = dir.join("metrics.jsonl");
        let file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&path)?;
        let len = file.metadata()?.len();
        if len > 0 {
            let whole = last_line_end(&file, len)?;
            if whole < len {
                tracing::warn!("metrics.jsonl: cutting off a torn last line");
                file.set_len(whole)?;
            }
        }
        Ok(Metrics {
            file,
            start: std::time::Instant::now(),
            wall_offset,
        })
    }

    /// The step of the last `step` event in `dir/metrics.jsonl` (None if there is none). A
    /// round can be in the write-ahead log but not yet reported when the coordinator is
    /// killed; this tells a restart which to report.
    pub fn last_step_reported(dir: &Path) -> Result<Option<u64>> {
        let file = match File::open(dir.join("metrics.jsonl")) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let mut last = None;
        for line in BufReader::new(file).split(b'\n') {
            let line = line?;
            // Parse only the lines that can be step events.
            if line.windows(STEP_TAG.len()).any(|w| w == STEP_TAG) {
                if let Ok(v) = serde_json::from_slice::<Value>(&line) {
                    if v["event"] == "step" {
                        last = v["step"].as_u64().or(last);
                    }
                }
            }
        }
        Ok(last)
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
        let line = Value::Object(obj).to_string();
        if let Err(e) = writeln!(self.file, "{line}").and_then(|_| self.file.flush()) {
            tracing::error!("cannot write metrics.jsonl: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_torn_last_line_is_cut_and_the_last_step_found() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        assert_eq!(Metrics::last_step_reported(dir.path()).unwrap(), None);
        std::fs::write(
            &path,
            "{\"event\":\"step\",\"step\":6}\n{\"event\":\"step\",\"step\":7}\n{\"event\":\"eval\",\"step\":7}\n{\"event\":\"st",
        )
        .unwrap();
        let mut m = Metrics::open(dir.path(), 0.0).unwrap();
        m.emit("step", json!({"step": 8}));
        drop(m);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 4);
        assert!(text
            .lines()
            .all(|l| serde_json::from_str::<Value>(l).is_ok()));
        assert_eq!(Metrics::last_step_reported(dir.path()).unwrap(), Some(8));
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
