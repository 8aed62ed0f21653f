//! Harness for the integration tests: starts real coordinator and worker processes on
//! loopback, reads their `metrics.jsonl`, and cleans up after itself.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Path of a binary of this workspace, built by `cargo build --bins` (as `make test` does).
pub fn bin(name: &str) -> PathBuf {
    // Test executables live in target/<profile>/deps/.
    let exe = std::env::current_exe().expect("current exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    let p = profile_dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --bins` first (make test does)",
        p.display()
    );
    p
}

/// A free UDP port on 127.0.0.1 (bound, read, released).
pub fn free_port() -> u16 {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    s.local_addr().expect("addr").port()
}

/// A coordinator process with its own temporary output directory.
pub struct Coordinator {
    /// The output directory (and config location).
    pub dir: tempfile::TempDir,
    /// The process.
    pub child: Option<Child>,
    config: PathBuf,
}

/// Config text for a quick run; `extra` is appended (later tables may override nothing
/// already given, so pass only tables not present here).
pub fn quick_config(model: &str, steps: u64, batch: usize, listen: &str, extra: &str) -> String {
    config(model, steps, batch, listen, 1, 1, extra)
}

/// [`quick_config`] on a free loopback port for a run that waits for `min_workers` workers
/// and runs `local_steps` global batches a round.
pub fn swarm_config(
    model: &str,
    steps: u64,
    batch: usize,
    min_workers: usize,
    local_steps: u32,
    extra: &str,
) -> String {
    config(
        model,
        steps,
        batch,
        "127.0.0.1:0",
        min_workers,
        local_steps,
        extra,
    )
}

fn config(
    model: &str,
    steps: u64,
    batch: usize,
    listen: &str,
    min_workers: usize,
    local_steps: u32,
    extra: &str,
) -> String {
    format!(
        r#"
[run]
output_dir = "out"
seed = 7
listen = "{listen}"
min_workers = {min_workers}

[model]
kind = "{model}"

[training]
global_batch = {batch}
steps = {steps}
local_steps = {local_steps}
threads = 1

[network]
idle_timeout_s = 3
handshake_timeout_s = 3
first_task_timeout_s = 20
min_task_timeout_s = 2

{extra}
"#
    )
}

/// The `[model]` table of a tiny Llama-style model (vocab 256, width 32, 2 layers, 4 query
/// and 2 key/value heads: 34,976 parameters) for language-model tests.
pub const TINY_LLAMA: &str = r#"
[model.llama]
vocab_size = 256
hidden_size = 32
intermediate_size = 64
num_hidden_layers = 2
num_attention_heads = 4
num_key_value_heads = 2
max_position_embeddings = 64
rope_theta = 10000.0
rms_norm_eps = 1e-5
"#;

/// A language-model run config like [`swarm_config`]: the tiny Llama on the shard folder
/// `shards`, windows of `seq_len` tokens.
pub fn lm_config(
    steps: u64,
    batch: usize,
    min_workers: usize,
    local_steps: u32,
    shards: &Path,
    seq_len: usize,
    extra: &str,
) -> String {
    let cfg = config(
        "llama",
        steps,
        batch,
        "127.0.0.1:0",
        min_workers,
        local_steps,
        extra,
    );
    // `[model.llama]` right after `[model]`, `[data]` at the end (extra may hold tables).
    cfg.replacen(
        "kind = \"llama\"\n",
        &format!("kind = \"llama\"\n{TINY_LLAMA}"),
        1,
    ) + &format!(
        "\n[data]\nshards = \"{}\"\nseq_len = {seq_len}\n",
        shards.display()
    )
}

impl Coordinator {
    /// Writes `config` into a fresh directory and starts `coordinator run` on it.
    pub fn start(config: &str) -> Self {
        Self::start_with(config, &[])
    }

    /// [`Coordinator::start`] with extra arguments (for test-only flags).
    pub fn start_with(config: &str, extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("run.toml");
        std::fs::write(&path, config).expect("write config");
        let mut c = Coordinator {
            dir,
            child: None,
            config: path,
        };
        c.spawn_with(extra);
        c
    }

    /// (Re)starts the process on the same config and directory.
    pub fn spawn(&mut self) {
        self.spawn_with(&[]);
    }

    /// Starts the coordinator process with extra arguments (for test-only flags).
    pub fn spawn_with(&mut self, extra: &[&str]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("coordinator.log"))
            .expect("log");
        let child = Command::new(bin("coordinator"))
            .args(["run", "--config"])
            .arg(&self.config)
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn coordinator");
        self.child = Some(child);
    }

    /// The config file it runs on.
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The run's output directory.
    pub fn out(&self) -> PathBuf {
        self.dir.path().join("out")
    }

    /// Waits for the join string.
    pub fn join_string(&self) -> String {
        let p = self.out().join("join.txt");
        wait_until(Duration::from_secs(60), || {
            std::fs::read_to_string(&p).ok().filter(|s| !s.is_empty())
        })
        .unwrap_or_else(|| panic!("no join string; log:\n{}", self.log()))
        .trim()
        .to_string()
    }

    /// The coordinator's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("coordinator.log")).unwrap_or_default()
    }

    /// All events of `metrics.jsonl` so far.
    pub fn metrics(&self) -> Vec<Value> {
        std::fs::read_to_string(self.out().join("metrics.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Events named `name`.
    pub fn events(&self, name: &str) -> Vec<Value> {
        self.metrics()
            .into_iter()
            .filter(|e| e["event"] == name)
            .collect()
    }

    /// Worker names by their key (hex), from the `worker_joined` events.
    pub fn names(&self) -> std::collections::HashMap<String, String> {
        self.events("worker_joined")
            .into_iter()
            .filter_map(|e| {
                let name = e["name"].as_str()?.split('@').next()?.to_string();
                Some((e["worker"].as_str()?.to_string(), name))
            })
            .collect()
    }

    /// The last `summary` event; panics with the log when there is none.
    pub fn summary(&self) -> Value {
        self.events("summary")
            .pop()
            .unwrap_or_else(|| panic!("no summary; log:\n{}", self.log()))
    }

    /// Steps completed according to the metrics.
    pub fn steps_done(&self) -> u64 {
        self.events("step")
            .last()
            .and_then(|e| e["step"].as_u64())
            .unwrap_or(0)
    }

    /// Waits for the process to exit; panics after `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let child = self.child.as_mut().expect("running");
        let status = wait_until(timeout, || child.try_wait().expect("try_wait"));
        match status {
            Some(s) => {
                self.child = None;
                s
            }
            None => panic!(
                "coordinator still running after {timeout:?}; log:\n{}",
                self.log()
            ),
        }
    }

    /// Sends a signal to the process.
    pub fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .args([sig, &c.id().to_string()])
                .status();
        }
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A worker process; killed on drop.
pub struct Worker {
    /// The process.
    pub child: Child,
    log: PathBuf,
}

impl Worker {
    /// Starts `worker --join JOIN` with one thread, a key in `dir`, and `extra` arguments;
    /// unless `extra` names one, the data folder is Debian's Fashion-MNIST (so an image
    /// run's worker downloads nothing).
    pub fn start(join: &str, dir: &Path, name: &str, extra: &[&str]) -> Self {
        Self::start_env(join, dir, name, extra, &[])
    }

    /// [`Worker::start`] with `env` added to its environment (e.g. `ATEN_CPU_CAPABILITY`,
    /// to compute as another CPU does).
    pub fn start_env(
        join: &str,
        dir: &Path,
        name: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let mut args = local_data(extra);
        args.extend(extra.iter().map(|s| s.to_string()));
        Self::spawn(join, dir, name, &args, env)
    }

    /// A worker as a volunteer starts it: no data folder, so it fetches the run's data from
    /// the coordinator into its cache (`dir/cache` unless `extra` names one).
    pub fn start_fetching(join: &str, dir: &Path, name: &str, extra: &[&str]) -> Self {
        let mut args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        if !extra.contains(&"--cache-dir") {
            args.extend([
                "--cache-dir".into(),
                dir.join("cache").display().to_string(),
            ]);
        }
        Self::spawn(join, dir, name, &args, &[])
    }

    fn spawn(join: &str, dir: &Path, name: &str, args: &[String], env: &[(&str, &str)]) -> Self {
        let log = dir.join(format!("{name}.log"));
        let child = worker_command(join, &dir.join(format!("{name}.key")), 60)
            .args(["--name", name])
            .args(args)
            .envs(env.iter().copied())
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("spawn worker");
        Worker { child, log }
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the process to exit.
    pub fn wait(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        wait_until(timeout, || self.child.try_wait().expect("try_wait"))
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `worker --join JOIN` on one CPU thread with key file `key`, retrying for `retry_s`
/// seconds (no data folder: add `--data-dir` or `--cache-dir`).
pub fn worker_command(join: &str, key: &Path, retry_s: u32) -> Command {
    let mut c = Command::new(bin("worker"));
    c.args(["--join", join, "--threads", "1", "--device", "cpu"])
        .args(["--retry-for", &retry_s.to_string()])
        .arg("--key")
        .arg(key);
    c
}

/// `--data-dir` with Debian's Fashion-MNIST unless `extra` gives one.
fn local_data(extra: &[&str]) -> Vec<String> {
    let mut args = Vec::new();
    if !extra.contains(&"--data-dir") {
        args.extend([
            "--data-dir".into(),
            "/usr/share/datasets/fashion-mnist".into(),
        ]);
    }
    args
}

/// Runs a worker to completion and returns its output (for handshake failures).
pub fn run_worker_to_end(join: &str, dir: &Path, extra: &[&str]) -> Output {
    worker_command(join, &dir.join("refused.key"), 5)
        .args(local_data(extra))
        .args(extra)
        .output()
        .expect("run worker")
}

/// Polls `f` every 50 ms until it returns `Some` or `timeout` passes.
pub fn wait_until<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if start.elapsed() > timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
