//! `coordinator run --config FILE`: starts (or resumes) a training run.

use std::path::PathBuf;

use anyhow::Result;
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
        /// TEST ONLY: exit (status 137, as `kill -9`) once round N is logged, before it is
        /// reported.
        #[arg(long, hide = true)]
        test_crash_after_logging: Option<u64>,
    },
    /// Check a config file and print it with all defaults filled in.
    Check {
        /// The run config.
        #[arg(long)]
        config: PathBuf,
    },
}

#[tokio::main]
async fn main() -> Result<()> {
    trainer::runtime::init_logging();
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Run {
            config,
            steps,
            test_crash_after_logging,
        } => {
            let mut cfg = coordinator::RunConfig::load(&config)?;
            cfg.test_crash_after_logging = test_crash_after_logging;
            if steps.is_some() {
                cfg.training.steps = steps;
                cfg.validate()?;
            }
            let outcome = coordinator::run(cfg).await?;
            tracing::info!(?outcome, "coordinator exiting");
        }
        Cmd::Check { config } => {
            let cfg = coordinator::RunConfig::load(&config)?;
            println!("{}", toml::to_string_pretty(&cfg)?);
        }
    }
    Ok(())
}
