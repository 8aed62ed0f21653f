//! `coordinator run --config FILE`: starts (or resumes) a training run.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(version, about = "Coordinates a training run over volunteer workers")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start a run from a TOML config, or resume it from the checkpoint in its output dir.
    Run {
        /// The run config.
        #[arg(long)]
        config: PathBuf,
        /// Override `training.steps`.
        #[arg(long)]
        steps: Option<u64>,
        /// TEST ONLY (cargo feature `test-hooks`): exit (status 137, as `kill -9`) once
        /// round N is logged, before it is reported.
        #[cfg(feature = "test-hooks")]
        #[arg(long)]
        test_crash_after_logging: Option<u64>,
        /// TEST ONLY (cargo feature `test-hooks`): flip one byte in each of the first N
        /// group replies of the data streams.
        #[cfg(feature = "test-hooks")]
        #[arg(long, default_value_t = 0)]
        test_corrupt_data: u64,
    },
    /// Print the run's summary: live from its status server (`[monitor] listen`), or from
    /// its output dir when it is not running.
    Status {
        /// The run config.
        #[arg(long)]
        config: PathBuf,
    },
    /// Operator actions through the run's status server, with the token of its identity.json.
    Ctl {
        /// The run config.
        #[arg(long)]
        config: PathBuf,
        #[command(subcommand)]
        action: CtlAction,
    },
    /// Check a config file and what it names (model, data, initial weights) as `run` does
    /// before it starts, and print the config with all defaults filled in.
    Check {
        /// The run config.
        #[arg(long)]
        config: PathBuf,
    },
    /// Internal: re-execute one spot check in this process's compute class (the job on
    /// stdin, the verdict on stdout); the coordinator starts it with a worker's class
    /// settings in the environment.
    #[command(hide = true)]
    Recheck,
    /// Data sets for language-model runs.
    Data {
        #[command(subcommand)]
        cmd: DataCmd,
    },
}

#[derive(Subcommand)]
enum CtlAction {
    /// Open no new round after the one in flight (workers stay connected).
    Pause,
    /// Open rounds again.
    Resume,
    /// Save a checkpoint and stop (the run resumes with `coordinator run`).
    Stop,
    /// Ban a worker's key: it is disconnected, its unverified contributions are rolled back.
    Ban {
        /// The key (64 hex digits, as /api/workers and metrics.jsonl show it).
        worker: String,
        /// Why (recorded in metrics.jsonl).
        #[arg(long, default_value = "banned by the operator")]
        reason: String,
    },
}

#[derive(Subcommand)]
enum DataCmd {
    /// Tokenize text files into token shards with a manifest.json (for `[data] shards`).
    Prepare {
        /// Text files, or folders (their files are read recursively, sorted by path).
        #[arg(long, num_args = 1.., required = true)]
        input: Vec<PathBuf>,
        /// `byte` (byte-level ids, vocabulary 256) or the path of a Hugging Face tokenizer.json.
        #[arg(long, default_value = "byte")]
        tokenizer: coordinator::prepare::TokenizerChoice,
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
        /// Fraction of the tokens held out as the validation shard (evenly spaced blocks).
        #[arg(long, default_value_t = 0.01)]
        val_fraction: f64,
        /// Most tokens per training shard.
        #[arg(long, default_value_t = 1 << 24)]
        shard_tokens: u64,
        /// Skip files in folders whose names end with this (repeatable), e.g. `.dat`.
        #[arg(long)]
        skip_suffix: Vec<String>,
    },
}

fn main() -> Result<()> {
    trainer::runtime::init_logging();
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Run {
            config,
            steps,
            #[cfg(feature = "test-hooks")]
            test_crash_after_logging,
            #[cfg(feature = "test-hooks")]
            test_corrupt_data,
        } => {
            let mut cfg = coordinator::RunConfig::load(&config)?;
            #[cfg(feature = "test-hooks")]
            {
                cfg.test_crash_after_logging = test_crash_after_logging;
                cfg.test_corrupt_data = test_corrupt_data;
            }
            cfg.recheck_exe = std::env::current_exe().ok();
            if steps.is_some() {
                cfg.training.steps = steps;
                cfg.validate()
                    .with_context(|| format!("{} with --steps", config.display()))?;
            }
            if cfg.workers.portable {
                // Before libtorch, MKL and oneDNN start (they read these once), and before
                // any other thread exists.
                for (k, v) in executor::class::PORTABLE_ENV {
                    std::env::set_var(k, v);
                }
            }
            let runtime = tokio::runtime::Runtime::new()?;
            let outcome = runtime.block_on(coordinator::run(cfg))?;
            tracing::info!(?outcome, "coordinator exiting");
        }
        Cmd::Recheck => {
            coordinator::checks::serve_emulated_check(std::io::stdin().lock(), std::io::stdout())?;
        }
        Cmd::Status { config } => {
            let cfg = coordinator::RunConfig::load(&config)?;
            print!(
                "{}",
                coordinator::monitor::report::status_text(&cfg.run.output_dir, cfg.monitor.listen)?
            );
        }
        Cmd::Ctl { config, action } => {
            let cfg = coordinator::RunConfig::load(&config)?;
            let Some(listen) = cfg.monitor.listen else {
                anyhow::bail!(
                    "{}: no [monitor] listen, so the run takes no actions",
                    config.display()
                );
            };
            let (name, ban) = match &action {
                CtlAction::Pause => ("pause", None),
                CtlAction::Resume => ("resume", None),
                CtlAction::Stop => ("stop", None),
                CtlAction::Ban { worker, reason } => {
                    ("ban", Some((worker.as_str(), reason.as_str())))
                }
            };
            println!(
                "{}",
                coordinator::monitor::report::act(&cfg.run.output_dir, listen, name, ban)?
            );
        }
        Cmd::Check { config } => {
            let cfg = coordinator::RunConfig::load(&config)?;
            // Everything `run` would refuse before it starts: the model, the data, the
            // initial weights, the frame cap.
            let inputs = coordinator::check_inputs(&cfg)?;
            println!("{}", toml::to_string_pretty(&cfg)?);
            println!(
                "# checked: model {} with {} parameters; data {}: {} training samples, {} held out{}",
                inputs.spec.name(),
                inputs.n_params,
                inputs.data.name,
                inputs.data.train.len(),
                inputs.data.test.len(),
                if inputs.init.is_some() {
                    "; model.init matches the model"
                } else {
                    ""
                }
            );
        }
        Cmd::Data {
            cmd:
                DataCmd::Prepare {
                    input,
                    tokenizer,
                    out,
                    val_fraction,
                    shard_tokens,
                    skip_suffix,
                },
        } => {
            let m = coordinator::prepare::prepare(&coordinator::prepare::PrepareOptions {
                inputs: input,
                tokenizer,
                out: out.clone(),
                val_fraction,
                shard_tokens,
                skip_suffixes: skip_suffix,
            })?;
            let train: u64 = m.train.iter().map(|s| s.tokens).sum();
            println!(
                "{}: {} training shards, {train} training tokens, {} validation tokens, vocabulary {} ({})",
                out.display(),
                m.train.len(),
                m.val.tokens,
                m.tokenizer.vocab_size,
                m.tokenizer.kind
            );
        }
    }
    Ok(())
}
