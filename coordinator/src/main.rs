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
        Cmd::Run { config, steps } => {
            let mut cfg = coordinator::RunConfig::load(&config)?;
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
