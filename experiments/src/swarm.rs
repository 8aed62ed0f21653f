//! Runs a real swarm for an experiment: a coordinator and worker processes on loopback
//! (the release binaries next to this one), and reads back its metrics.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// Debian's Fashion-MNIST as the worker's `--data-dir` unless `extra` gives one, so a
/// worker of an image run downloads nothing.
pub fn local_data(extra: &[String]) -> Vec<String> {
    if extra.iter().any(|a| a == "--data-dir") {
        Vec::new()
    } else {
        vec!["--data-dir".into(), trainer::data::DEFAULT_DIR.into()]
    }
}

/// Path of a binary of this workspace next to the running one.
pub fn sibling(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let p = exe.parent().context("exe folder")?.join(name);
    if !p.exists() {
        bail!(
            "{} is missing: build the workspace's binaries first",
            p.display()
        );
    }
    Ok(p)
}

/// A finished run: its folder and its `metrics.jsonl` events.
pub struct Finished {
    /// The run's folder (config, logs, `out/`).
    pub dir: PathBuf,
    /// Every event.
    pub events: Vec<Value>,
    /// CPU seconds the whole machine was busy (every process) while the run went on, from
    /// `/proc/stat`; NaN where that file is missing.
    pub machine_cpu_s: f64,
}

impl Finished {
    /// Events named `name`.
    pub fn events(&self, name: &str) -> Vec<&Value> {
        self.events.iter().filter(|e| e["event"] == name).collect()
    }

    /// The summary event.
    pub fn summary(&self) -> Result<&Value> {
        self.events("summary")
            .pop()
            .with_context(|| format!("no summary in {}", self.dir.display()))
    }
}

/// A `workers` entry that runs the worker under the `SCHED_IDLE` policy (`chrt --idle 0`,
/// util-linux): it gets a CPU only when nothing else on the machine wants it, as if it ran
/// on a machine of its own.
pub const IDLE: &str = "sched:idle";

/// The command an [`IDLE`] worker runs under.
pub const IDLE_COMMAND: [&str; 3] = ["chrt", "--idle", "0"];

/// Kills its processes when dropped.
pub struct Procs(pub Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs `config` (TOML; its `output_dir` must be `out`) in a fresh `dir` with one worker per
/// entry of `workers` (extra arguments for each; an entry `env:KEY=VALUE` sets a variable
/// of the worker's environment instead, e.g. to compute as another CPU does, and [`IDLE`]
/// runs it under `SCHED_IDLE`) and the `sidecars` (program and arguments,
/// `{join}` replaced by the join string) beside them, waits for the run to end, and returns
/// its metrics.
pub fn run(
    dir: &Path,
    config: &str,
    workers: &[Vec<String>],
    sidecars: &[Vec<String>],
) -> Result<Finished> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let dir = std::path::absolute(dir)?;
    std::fs::write(dir.join("run.toml"), config)?;
    let busy_before = machine_busy_s();
    let (mut procs, join) = start_coordinator(&dir)?;
    for (i, extra) in workers.iter().enumerate() {
        let mut cmd = if extra.iter().any(|a| a == IDLE) {
            let mut c = Command::new(IDLE_COMMAND[0]);
            c.args(&IDLE_COMMAND[1..]).arg(sibling("worker")?);
            c
        } else {
            Command::new(sibling("worker")?)
        };
        procs.0.push(
            cmd.args([
                "--join",
                &join,
                "--threads",
                "1",
                "--device",
                "cpu",
                "--retry-for",
                "30",
            ])
            .args(["--name", &format!("w{i}")])
            .arg("--key")
            .arg(dir.join(format!("w{i}.key")))
            .args(local_data(extra))
            .args(
                extra
                    .iter()
                    .filter(|a| !a.starts_with("env:") && *a != IDLE),
            )
            .envs(
                extra
                    .iter()
                    .filter_map(|a| a.strip_prefix("env:")?.split_once('=')),
            )
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join(format!("w{i}.log")))?)
            .spawn()?,
        );
    }
    for (i, cmd) in sidecars.iter().enumerate() {
        let Some((prog, args)) = cmd.split_first() else {
            continue;
        };
        procs.0.push(
            Command::new(prog)
                .args(args.iter().map(|a| a.replace("{join}", &join)))
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.join(format!("sidecar{i}.log")))?)
                .spawn()?,
        );
    }
    let status = procs.0[0].wait()?;
    let machine_cpu_s = machine_busy_s() - busy_before;
    drop(procs);
    if !status.success() {
        bail!("coordinator failed; see {}", dir.display());
    }
    let events = std::fs::read_to_string(dir.join("out/metrics.jsonl"))?
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    Ok(Finished {
        dir,
        events,
        machine_cpu_s,
    })
}

/// Seconds of CPU time this machine has spent busy since boot, over all cores (the `cpu`
/// line of `/proc/stat`: user, nice, system, irq, softirq and steal, in clock ticks of
/// `sysconf(_SC_CLK_TCK)`); NaN where the file cannot be read.
pub fn machine_busy_s() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return f64::NAN;
    };
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return f64::NAN;
    };
    let f: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let busy: f64 = [0, 1, 2, 5, 6, 7].iter().filter_map(|&i| f.get(i)).sum();
    // SAFETY: sysconf only reads a configuration value.
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    if tick > 0.0 {
        busy / tick
    } else {
        f64::NAN
    }
}

/// Starts a coordinator on `dir/run.toml` (its `output_dir` must be `out`), logging to
/// `dir/coordinator.log`, and waits for its join string; the coordinator is the first
/// process of the returned set (all killed when it is dropped).
pub fn start_coordinator(dir: &Path) -> Result<(Procs, String)> {
    let coord = Command::new(sibling("coordinator")?)
        .args(["run", "--config"])
        .arg(dir.join("run.toml"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("coordinator.log"))?)
        .spawn()?;
    let mut procs = Procs(vec![coord]);
    let join_path = dir.join("out/join.txt");
    let start = Instant::now();
    while !join_path.exists() {
        if start.elapsed() > Duration::from_secs(60) || procs.0[0].try_wait()?.is_some() {
            bail!("coordinator in {} did not start", dir.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let join = std::fs::read_to_string(&join_path)?.trim().to_string();
    Ok((procs, join))
}

/// The `[run]`, `[model]`, `[training]` and `[workers]` tables every experiment starts from:
/// one thread per worker and equal shares, so that a run's numbers are the same on a re-run
/// (only the times change).
pub fn base_config(
    model: &str,
    batches: u64,
    batch: usize,
    h: u32,
    min_workers: usize,
    seed: u64,
) -> String {
    format!(
        "[run]\noutput_dir = \"out\"\nseed = {seed}\nlisten = \"127.0.0.1:0\"\nresume = false\n\
         min_workers = {min_workers}\n\n[model]\nkind = \"{model}\"\n\n\
         [training]\nglobal_batch = {batch}\nsteps = {batches}\nlocal_steps = {h}\nthreads = 1\n\n\
         [workers]\ndeterministic_threads = 1\nbalance_by_speed = false\n\n"
    )
}
