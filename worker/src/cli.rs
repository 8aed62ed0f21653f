//! The command line of `worker --join dtrain://...` (and of `dtrain-worker`, the same
//! program installed from the Python wheel): joins a run and works until it ends.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

#[derive(Parser)]
#[command(
    version,
    about = "Volunteer worker: lends this machine's CPU or GPU to a training run"
)]
struct Cli {
    /// The join string printed by the coordinator (dtrain://SECRET@HOST:PORT/FINGERPRINT).
    #[arg(long)]
    join: String,
    /// A folder that may already hold the run's data files (e.g. Debian's
    /// /usr/share/datasets/fashion-mnist, or a shard folder); each is checked by its BLAKE3
    /// hash, and what is missing or different is downloaded from the coordinator.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Where downloaded data files are kept, by hash, for later runs
    /// (default: $XDG_CACHE_HOME/dtrain, else ~/.cache/dtrain).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Largest size of the data cache in gigabytes (10^9 bytes); the least recently used
    /// files of other runs are removed to stay under it.
    #[arg(long, default_value_t = 20.0)]
    cache_max_gb: f64,
    /// Most compute threads the worker uses (default: libtorch's choice, one per core). A
    /// run that fixes its thread count for bit-exact checks uses its count, and is left if
    /// that is more.
    #[arg(long, visible_alias = "threads")]
    max_threads: Option<usize>,
    /// No status line, and only warnings and errors in the log (for services).
    #[arg(long)]
    quiet: bool,
    /// File holding this worker's persistent identity key (created if missing).
    #[arg(long)]
    key: Option<PathBuf>,
    /// Name shown to the coordinator (default: the host name).
    #[arg(long)]
    name: Option<String>,
    /// Compute device.
    #[arg(long, value_enum, default_value = "auto")]
    device: DeviceArg,
    /// Give up after failing to reach the coordinator for this many seconds.
    #[arg(long, default_value_t = 600.0)]
    retry_for: f64,
    /// Most megabits per second the worker sends (results, replies); default: no cap.
    #[arg(long)]
    max_upload_mbps: Option<f64>,
    /// Run at this lower CPU priority (nice value 0..=19), so the machine's owner comes
    /// first.
    #[arg(long, default_value_t = 0)]
    nice: i32,
    #[cfg(feature = "test-hooks")]
    #[command(flatten)]
    hooks: HookArgs,
}

/// TEST ONLY (cargo feature `test-hooks`): misbehaviours on purpose, for tests and
/// experiments.
#[cfg(feature = "test-hooks")]
#[derive(clap::Args)]
struct HookArgs {
    /// TEST ONLY: announce another protocol version.
    #[arg(long)]
    test_protocol_version: Option<u32>,
    /// TEST ONLY: exit abruptly on receiving the N-th task, as if killed mid-step.
    #[arg(long)]
    test_crash_at_task: Option<u64>,
    /// TEST ONLY: cheat on tasks (noise, scaled, sign-flip, zero, stale, wrong-data, copy,
    /// partial), to test and measure the coordinator's spot checks.
    #[arg(long)]
    test_adversary: Option<crate::adversary::Mode>,
    /// TEST ONLY: fraction of tasks the adversary cheats on.
    #[arg(long, default_value_t = 1.0)]
    test_cheat_rate: f64,
    /// TEST ONLY: break the protocol (nan, wrong-shape, truncated, replay, unknown-task,
    /// bad-signature, junk-frame, oversized), to test the coordinator's defences.
    #[arg(long)]
    test_hostile: Option<crate::hostile::Hostile>,
    /// TEST ONLY: take this many times as long per task, as a slow machine would.
    #[arg(long, default_value_t = 1.0)]
    test_slowdown: f64,
}

#[cfg(feature = "test-hooks")]
impl HookArgs {
    fn hooks(&self) -> crate::test_hooks::TestHooks {
        crate::test_hooks::TestHooks {
            protocol_version: self.test_protocol_version,
            crash_at_task: self.test_crash_at_task,
            adversary: self.test_adversary.map(|m| (m, self.test_cheat_rate)),
            hostile: self.test_hostile,
            slowdown: self.test_slowdown,
        }
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum DeviceArg {
    /// A GPU if one is usable, else the CPU.
    Auto,
    /// Always the CPU.
    Cpu,
}

/// Ctrl-C or SIGTERM (how a service manager stops the worker).
async fn stop_requested() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(t) => t,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// `$VAR`, else `~/fallback` (XDG base directories), else the current folder; then `rest`.
fn xdg(var: &str, fallback: &str, rest: &str) -> PathBuf {
    let base = std::env::var_os(var)
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(fallback)))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join(rest)
}

fn default_cache() -> PathBuf {
    xdg("XDG_CACHE_HOME", ".cache", "dtrain")
}

fn default_key() -> PathBuf {
    xdg("XDG_DATA_HOME", ".local/share", "dtrain/worker.key")
}

/// Where log lines go: stderr, above the status line when there is one.
#[derive(Clone)]
struct LogWriter(Option<ProgressBar>);

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match &self.0 {
            Some(bar) => bar.suspend(|| std::io::stderr().write(buf)),
            None => std::io::stderr().write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'w> tracing_subscriber::fmt::MakeWriter<'w> for LogWriter {
    type Writer = LogWriter;

    fn make_writer(&'w self) -> LogWriter {
        self.clone()
    }
}

/// Seconds between status lines in the log when stderr is not a terminal.
const LOG_STATUS_EVERY: Duration = Duration::from_secs(60);

/// Shows `stats`: redrawn twice a second on a terminal, else logged every minute.
fn show_status(bar: Option<ProgressBar>, stats: Arc<crate::status::Stats>) {
    tokio::spawn(async move {
        let every = if bar.is_some() {
            Duration::from_millis(500)
        } else {
            LOG_STATUS_EVERY
        };
        let mut tick = tokio::time::interval(every);
        tick.tick().await;
        loop {
            tick.tick().await;
            match &bar {
                Some(b) => b.set_message(stats.line()),
                None => tracing::info!("status: {}", stats.line()),
            }
        }
    });
}

/// Parses the command line and runs the worker to its end.
///
/// # Errors
/// Bad arguments, a refused join, an unreachable coordinator, local set-up failures.
pub fn main() -> Result<()> {
    let cli = Cli::parse();
    tokio::runtime::Runtime::new()
        .context("starting the async runtime")?
        .block_on(run(cli))
}

async fn run(cli: Cli) -> Result<()> {
    let bar = (!cli.quiet && std::io::stderr().is_terminal()).then(|| {
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr_with_hz(4));
        bar.set_style(
            ProgressStyle::with_template("{spinner} {wide_msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        bar.enable_steady_tick(Duration::from_millis(250));
        bar
    });
    trainer::runtime::init_logging_to(
        LogWriter(bar.clone()),
        if cli.quiet { "warn" } else { "info" },
    );
    let ticket = cli.join.parse().context("--join")?;
    let name = cli.name.unwrap_or_else(|| {
        std::fs::read_to_string("/etc/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "worker".into())
    });
    anyhow::ensure!(
        cli.cache_max_gb.is_finite() && cli.cache_max_gb > 0.0,
        "--cache-max-gb must be a positive number of gigabytes"
    );
    if let Some(m) = cli.max_upload_mbps {
        anyhow::ensure!(
            m.is_finite() && (0.01..=100_000.0).contains(&m),
            "--max-upload-mbps must be in [0.01, 100000] megabits per second"
        );
    }
    anyhow::ensure!((0..=19).contains(&cli.nice), "--nice must be in 0..=19");
    if cli.nice > 0 {
        // SAFETY: setpriority only reads its integer arguments.
        let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, cli.nice) };
        anyhow::ensure!(
            r == 0,
            "--nice {}: {}",
            cli.nice,
            std::io::Error::last_os_error()
        );
    }
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        stop_requested().await;
        tracing::info!(
            "stopping after the task in hand (Ctrl-C again to stop at once, losing that task)"
        );
        let _ = stop_tx.send(true);
        stop_requested().await;
        std::process::exit(130);
    });
    let stats = Arc::new(crate::status::Stats::default());
    if !cli.quiet {
        show_status(bar.clone(), stats.clone());
    }
    let opts = crate::WorkerOptions {
        ticket,
        data_dir: cli.data_dir,
        cache: crate::fetch::CacheOptions {
            dir: cli.cache_dir.unwrap_or_else(default_cache),
            max_bytes: (cli.cache_max_gb * 1e9) as u64,
        },
        threads: cli.max_threads,
        key_path: cli.key.unwrap_or_else(default_key),
        name,
        allow_cuda: matches!(cli.device, DeviceArg::Auto),
        retry_for: Duration::from_secs_f64(cli.retry_for.max(0.0)),
        max_upload_mbps: cli.max_upload_mbps,
        stop,
        stats: stats.clone(),
        #[cfg(feature = "test-hooks")]
        hooks: cli.hooks.hooks(),
    };
    #[cfg(feature = "test-hooks")]
    if opts.hooks.adversarial() {
        tracing::warn!("TEST ONLY adversarial mode: this worker misbehaves on purpose");
    }
    let exit = crate::run(opts).await;
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    tracing::info!("{}", stats.line());
    match exit {
        Ok(crate::Exit::Done(reason)) => {
            tracing::info!("finished: {reason}");
            Ok(())
        }
        Ok(crate::Exit::Stopped) => {
            tracing::info!("stopped");
            Ok(())
        }
        Err(e) => {
            tracing::error!("{e}");
            Err(e.into())
        }
    }
}
