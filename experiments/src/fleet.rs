//! `experiments fleet`: many real worker processes on this machine against one coordinator.
//!
//! The MLP trains with 4 worker processes, then with `--workers` (default 100), one thread
//! each, rounds growing with the workers present (`max_global_batch`, 8 samples per worker
//! and inner batch). The workers' memory (proportional set size: libtorch's shared pages
//! count once in all) is measured in the small run first; the
//! large run uses fewer processes if that many would not fit in 80% of the memory available,
//! and says so. Reported per run: rounds, samples per round, median round time, samples per
//! second, the coordinator's and the workers' resident memory, and whether anything was lost
//! (every round committed with all the samples of the global batches it covered, the run
//! finished, no result rejected, no offence).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::stats::median;
use crate::swarm;

/// Settings of the experiment.
pub struct Settings {
    /// Worker processes of the large run.
    pub workers: usize,
    /// Rounds per run.
    pub rounds: u64,
    /// Output folder.
    pub out: PathBuf,
}

/// A `Key: N kB` field of a `/proc` file, in bytes; 0 when the file or field is missing.
fn proc_kb(path: &str, key: &str) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))?
                .split_whitespace()
                .nth(1)?
                .parse::<u64>()
                .ok()
        })
        .map_or(0, |kb| kb * 1024)
}

/// Proportional resident memory of process `pid` (its own pages, plus its share of pages
/// shared with others such as libtorch's code), bytes; 0 when gone.
fn pss(pid: u32) -> u64 {
    proc_kb(&format!("/proc/{pid}/smaps_rollup"), "Pss:")
}

/// Memory available on this machine, bytes.
fn available() -> u64 {
    proc_kb("/proc/meminfo", "MemAvailable:")
}

/// One run's figures.
struct Row {
    workers: usize,
    rounds: usize,
    samples_per_round: f64,
    median_round_ms: f64,
    samples_per_s: f64,
    coordinator_rss: u64,
    worker_rss: u64,
    parts: f64,
    lost: bool,
    join_s: f64,
}

fn one(dir: &Path, n: usize, rounds: u64) -> Result<Row> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let dir = std::path::absolute(dir)?;
    let batch = 64;
    let total_batches = rounds * (n as u64 * 8).div_ceil(batch as u64);
    let cfg = format!(
        "[run]\noutput_dir = \"out\"\nseed = 0\nlisten = \"127.0.0.1:0\"\nresume = false\n\
         min_workers = {n}\n\n[model]\nkind = \"mlp\"\n\n[training]\nglobal_batch = {batch}\n\
         steps = {}\nthreads = 1\nmax_global_batch = {}\nmin_micro_batch = 8\n\n\
         [optimizer]\nkind = \"adam\"\nlr = 0.001\n\n[network]\nmax_handshakes = 256\n\
         max_new_conns_per_s = 200\nfirst_task_timeout_s = 300\n",
        total_batches,
        (n * 8).div_ceil(batch) * batch
    );
    std::fs::write(dir.join("run.toml"), cfg)?;
    let (mut procs, join) = swarm::start_coordinator(&dir)?;
    let cpid = procs.0[0].id();
    let started = Instant::now();
    for i in 0..n {
        procs.0.push(
            Command::new(swarm::sibling("worker")?)
                .args(["--join", &join, "--threads", "1", "--device", "cpu"])
                .args(["--retry-for", "120", "--name", &format!("w{i}")])
                .args(swarm::local_data(&[]))
                .arg("--key")
                .arg(dir.join(format!("w{i}.key")))
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.join(format!("w{i}.log")))?)
                .spawn()?,
        );
    }
    let (mut coord_rss, mut workers_rss) = (0u64, 0u64);
    loop {
        if procs.0[0].try_wait()?.is_some() {
            break;
        }
        coord_rss = coord_rss.max(pss(cpid));
        let w: u64 = procs.0[1..].iter().map(|c| pss(c.id())).sum();
        workers_rss = workers_rss.max(w);
        if started.elapsed() > Duration::from_secs(1800) {
            bail!("run in {} did not end in 30 minutes", dir.display());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    drop(procs);
    let events: Vec<Value> = std::fs::read_to_string(dir.join("out/metrics.jsonl"))
        .context("metrics")?
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let of = |name: &str| -> Vec<&Value> { events.iter().filter(|e| e["event"] == name).collect() };
    let steps = of("step");
    let ms: Vec<f64> = steps.iter().filter_map(|s| s["step_ms"].as_f64()).collect();
    let samples: Vec<f64> = steps
        .iter()
        .map(|s| {
            s["samples"].as_array().map_or(0.0, |a| {
                a.iter().filter_map(|p| p["samples"].as_f64()).sum()
            })
        })
        .collect();
    let parts: f64 = steps
        .iter()
        .filter_map(|s| s["parts"].as_f64())
        .sum::<f64>()
        / steps.len().max(1) as f64;
    let first_step_at = events
        .iter()
        .find(|e| e["event"] == "step")
        .and_then(|e| e["wall_s"].as_f64())
        .unwrap_or(0.0);
    let summary = of("summary");
    let finished = summary
        .first()
        .is_some_and(|s| s["batches"].as_u64() == Some(total_batches));
    // Every round covers whole global batches: its samples are its batches times the batch.
    let mut before = 0u64;
    let mut short = false;
    for (st, n) in steps.iter().zip(&samples) {
        let done = st["batches"].as_u64().unwrap_or(0);
        short |= (*n as u64) != (done - before.min(done)) * batch as u64;
        before = done;
    }
    let lost = !finished || short || !of("rejected_result").is_empty() || !of("offence").is_empty();
    let total_ms: f64 = ms.iter().sum();
    Ok(Row {
        workers: n,
        rounds: steps.len(),
        samples_per_round: samples.iter().sum::<f64>() / samples.len().max(1) as f64,
        median_round_ms: median(&ms),
        samples_per_s: samples.iter().sum::<f64>() / (total_ms / 1000.0).max(1e-9),
        coordinator_rss: coord_rss,
        worker_rss: workers_rss / n.max(1) as u64,
        parts,
        lost,
        join_s: first_step_at,
    })
}

/// Runs 4 workers, then the large fleet; writes `fleet.md` and `fleet.csv`.
pub fn run(s: &Settings) -> Result<()> {
    std::fs::create_dir_all(&s.out)?;
    let small = one(&s.out.join("runs/4"), 4, s.rounds)?;
    let fits = (available() as f64 * 0.8 / small.worker_rss.max(1) as f64) as usize;
    let n = s.workers.min(fits.max(4));
    let note = if n < s.workers {
        format!(
            "{} workers would need {:.1} GiB at {:.0} MiB each; {n} fit in 80% of the memory available.\n\n",
            s.workers,
            (s.workers as u64 * small.worker_rss) as f64 / (1u64 << 30) as f64,
            small.worker_rss as f64 / (1u64 << 20) as f64
        )
    } else {
        String::new()
    };
    let large = one(&s.out.join(format!("runs/{n}")), n, s.rounds)?;
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    let mut md = format!(
        "{note}MLP, {} rounds, 8 samples per worker and inner batch (`experiments fleet`), worker processes with one thread each on this machine.\n\n\
         | workers | parts per round | samples per round | median round | samples/s | coordinator memory | memory per worker process | all joined after | nothing lost |\n|---:|---:|---:|---:|---:|---:|---:|---:|---|\n",
        s.rounds
    );
    let mut csv = std::fs::File::create(s.out.join("fleet.csv"))?;
    writeln!(csv, "workers,rounds,parts,samples_per_round,median_round_ms,samples_per_s,coordinator_rss,worker_rss,join_s,lost")?;
    for r in [&small, &large] {
        md.push_str(&format!(
            "| {} | {:.1} | {:.0} | {:.0} ms | {:.0} | {:.0} MiB | {:.0} MiB | {:.0} s | {} |\n",
            r.workers,
            r.parts,
            r.samples_per_round,
            r.median_round_ms,
            r.samples_per_s,
            mib(r.coordinator_rss),
            mib(r.worker_rss),
            r.join_s,
            if r.lost { "no" } else { "yes" }
        ));
        writeln!(
            csv,
            "{},{},{:.2},{:.1},{:.2},{:.1},{},{},{:.1},{}",
            r.workers,
            r.rounds,
            r.parts,
            r.samples_per_round,
            r.median_round_ms,
            r.samples_per_s,
            r.coordinator_rss,
            r.worker_rss,
            r.join_s,
            r.lost
        )?;
    }
    md.push_str(&format!(
        "\nRound time {:.1}x that of 4 workers for {:.0}x the samples per round.\n",
        large.median_round_ms / small.median_round_ms,
        large.samples_per_round / small.samples_per_round.max(1.0)
    ));
    std::fs::write(s.out.join("fleet.md"), &md)?;
    println!("{md}\nwritten to {}", s.out.display());
    Ok(())
}
