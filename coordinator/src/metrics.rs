//! `metrics.jsonl`: one JSON object a line, appended and flushed as events happen, plus
//! the traffic counters shared by the connection tasks.

use std::fs::{File, OpenOptions};
use std::io::Write;
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

/// Appends events to `metrics.jsonl`.
pub struct Metrics {
    file: File,
    start: std::time::Instant,
    wall_offset: f64,
}

impl Metrics {
    /// Opens (appending) `dir/metrics.jsonl`; `wall_offset` is the wall time of earlier sessions.
    pub fn open(dir: &Path, wall_offset: f64) -> Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("metrics.jsonl"))?;
        Ok(Metrics {
            file,
            start: std::time::Instant::now(),
            wall_offset,
        })
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
