//! `experiments data-join`: does serving the data set to a new volunteer slow the running
//! rounds?
//!
//! Two workers that hold the data (`--data-dir`) train; a few seconds in, a third worker
//! joins with an empty cache and no data folder, so it downloads the whole training set
//! from the coordinator before it takes tasks. The coordinator's `data_served` event gives
//! when the download ran (its `fetch_s` up to the join); the round times of the window
//! before it are compared with those during it, for several `[data] serve_max_mbps` caps.

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::stats::median;
use crate::swarm;

/// Settings of the experiment.
pub struct Settings {
    /// The model: `mlp` or `cnn`.
    pub model: String,
    /// Global batches per run (enough to outlast the download).
    pub steps: u64,
    /// Global batch.
    pub batch: usize,
    /// Serving caps to try, megabits per second.
    pub mbps: Vec<f64>,
    /// Runs per cap.
    pub repeats: usize,
    /// Seconds into the run the new worker starts.
    pub join_after_s: f64,
    /// Output folder.
    pub out: PathBuf,
}

/// One run's figures.
struct Row {
    mbps: f64,
    bytes: u64,
    fetch_s: f64,
    before_ms: f64,
    during_ms: f64,
    rounds_during: usize,
}

/// Runs every cap `repeats` times; writes `data-join.csv` and `data-join.md`.
pub fn run(s: &Settings) -> Result<()> {
    std::fs::create_dir_all(&s.out)?;
    let worker = swarm::sibling("worker")?;
    let mut rows = Vec::new();
    for rep in 0..s.repeats.max(1) {
        for &mbps in &s.mbps {
            let dir = std::path::absolute(s.out.join(format!("runs/{mbps}-{rep}")))?;
            let cfg = format!(
                "[run]\noutput_dir = \"out\"\nseed = 0\nlisten = \"127.0.0.1:0\"\nresume = false\n\
                 min_workers = 2\n\n[model]\nkind = \"{}\"\n\n[training]\nglobal_batch = {}\n\
                 steps = {}\nthreads = 1\n\n[optimizer]\nkind = \"adam\"\nlr = 0.001\n\n\
                 [data]\nserve_max_mbps = {mbps}\n",
                s.model, s.batch, s.steps
            );
            let script = format!(
                "sleep {after}; exec {w} --join '{{join}}' --threads 1 --device cpu --retry-for 10 \
                 --name joiner --key {d}/joiner.key --cache-dir {d}/joiner-cache",
                after = s.join_after_s,
                w = worker.display(),
                d = dir.display(),
            );
            let sidecar = vec!["bash".to_string(), "-c".to_string(), script];
            let r = swarm::run(&dir, &cfg, &[vec![], vec![]], &[sidecar])?;
            let served = r
                .events("data_served")
                .first()
                .copied()
                .cloned()
                .with_context(|| {
                    format!("the new worker fetched nothing; see {}", dir.display())
                })?;
            let end = served["wall_s"].as_f64().unwrap_or(f64::NAN);
            let fetch_s = served["fetch_s"].as_f64().unwrap_or(f64::NAN);
            let start = end - fetch_s;
            let window = fetch_s.max(3.0);
            let rounds = |from: f64, to: f64| -> Vec<f64> {
                r.events("step")
                    .iter()
                    .filter(|e| e["wall_s"].as_f64().is_some_and(|t| t >= from && t < to))
                    .filter_map(|e| e["step_ms"].as_f64())
                    .collect()
            };
            let during = rounds(start, end);
            let row = Row {
                mbps,
                bytes: served["bytes"].as_u64().unwrap_or(0),
                fetch_s,
                before_ms: median(&rounds(start - window, start)),
                during_ms: median(&during),
                rounds_during: during.len(),
            };
            tracing::info!(
                mbps,
                fetch_s,
                before = row.before_ms,
                during = row.during_ms,
                "done"
            );
            rows.push(row);
        }
    }
    let mut csv = std::fs::File::create(s.out.join("data-join.csv"))?;
    writeln!(
        csv,
        "serve_max_mbps,bytes,fetch_s,rounds_during,median_round_ms_before,median_round_ms_during,ratio"
    )?;
    let mut md = format!(
        "{}, global batch {}, two workers holding the data; a third joins {} s in with an empty \
         cache and downloads the training set (`experiments data-join --model {} --batch {} \
         --steps {}`). Median round time in the window before the download (as long as the \
         download, at least 3 s) and during it.\n\n\
         | serve_max_mbps | downloaded | download time | rounds during | median round before | during | during / before |\n\
         |---:|---:|---:|---:|---:|---:|---:|\n",
        s.model.to_uppercase(),
        s.batch,
        s.join_after_s,
        s.model,
        s.batch,
        s.steps
    );
    for r in &rows {
        let ratio = r.during_ms / r.before_ms;
        writeln!(
            csv,
            "{},{},{:.3},{},{:.2},{:.2},{:.3}",
            r.mbps, r.bytes, r.fetch_s, r.rounds_during, r.before_ms, r.during_ms, ratio
        )?;
        md.push_str(&format!(
            "| {} | {:.1} MB | {:.2} s | {} | {:.1} ms | {:.1} ms | {:.2}x |\n",
            r.mbps,
            r.bytes as f64 / 1e6,
            r.fetch_s,
            r.rounds_during,
            r.before_ms,
            r.during_ms,
            ratio
        ));
    }
    std::fs::write(s.out.join("data-join.md"), &md)?;
    println!("{md}\nwritten to {}", s.out.display());
    Ok(())
}
