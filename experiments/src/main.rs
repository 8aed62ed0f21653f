//! Reproducible experiments. `experiments baseline` trains the model in one process (no
//! network, no workers) with the same schedule and optimizer as a swarm run, the yardstick
//! for the swarm's accuracy and wall time.

mod classes;
mod dashboard;
mod data_join;
mod fleet;
mod flood;
mod lm_bench;
mod lm_parity;
mod simulate;
mod stats;
mod stragglers;
mod swarm;
mod sweep;
mod verify;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use clap::{Parser, Subcommand};
use serde_json::json;
use trainer::reference::{train, ReferenceRun};
use trainer::{Dataset, ModelSpec, OptimizerConfig, TrainData};

/// A script of the repository's `scripts/` folder: from the current folder (experiments run
/// from the repository root), else from the source tree this binary was built from.
fn script(name: &str) -> PathBuf {
    let here = PathBuf::from("scripts").join(name);
    if here.exists() {
        here
    } else {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../scripts")
            .join(name)
    }
}

#[derive(Parser)]
#[command(about = "Reproducible experiments for the README's tables")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Single-process training: test accuracy after each epoch and seconds per epoch.
    Baseline {
        /// Epochs.
        #[arg(long, default_value_t = 2)]
        epochs: u64,
        /// Global batch.
        #[arg(long, default_value_t = 64)]
        batch: usize,
        /// Adam learning rate.
        #[arg(long, default_value_t = 1e-3)]
        lr: f64,
        /// Seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Compute threads.
        #[arg(long)]
        threads: Option<usize>,
        /// Data folder.
        #[arg(long, default_value = trainer::data::DEFAULT_DIR)]
        data_dir: PathBuf,
        /// Where to write the JSON result.
        #[arg(long, default_value = "results/baseline.json")]
        out: PathBuf,
    },
    /// The coordinator's round core driven by virtual workers in virtual time (churn,
    /// stragglers, silent workers, cheaters): core CPU per round and per event, and core
    /// memory per worker, for each fleet size: CSV, Markdown and a PNG plot.
    Simulate {
        /// Fleet sizes, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "10,100,1000,10000")]
        workers: Vec<usize>,
        /// Rounds per fleet.
        #[arg(long, default_value_t = 100)]
        rounds: u64,
        /// Seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Output folder.
        #[arg(long, default_value = "results/simulate")]
        out: PathBuf,
    },
    /// Many real worker processes (MLP, one thread each) against one coordinator, against 4:
    /// round time, throughput, memory, nothing lost: Markdown and CSV.
    Fleet {
        /// Worker processes of the large run (fewer if they would not fit in memory).
        #[arg(long, default_value_t = 100)]
        workers: usize,
        /// Rounds per run.
        #[arg(long, default_value_t = 40)]
        rounds: u64,
        /// Output folder.
        #[arg(long, default_value = "results/fleet")]
        out: PathBuf,
    },
    /// One fast worker alone and beside 1, 3, 10 workers 2x, 10x, 300x slower, and a burst of
    /// 20 slow new keys mid-run: wall time, accuracy, slow workers' share: CSV, Markdown and
    /// a PNG plot.
    Stragglers {
        /// The model: `mlp` or `cnn`.
        #[arg(long, default_value = "mlp")]
        model: String,
        /// Global batches per run.
        #[arg(long, default_value_t = 2000)]
        steps: u64,
        /// Global batch.
        #[arg(long, default_value_t = 64)]
        batch: usize,
        /// Passes over every configuration, in turn; each row reports its median run (this
        /// machine's speed drifts by 20% between runs).
        #[arg(long, default_value_t = 3)]
        repeat: usize,
        /// Output folder.
        #[arg(long, default_value = "results/stragglers")]
        out: PathBuf,
    },
    /// Round times before and while a new worker with an empty cache downloads the
    /// training set from the coordinator, for several serving caps: CSV and Markdown.
    DataJoin {
        /// The model: `mlp` or `cnn`.
        #[arg(long, default_value = "mlp")]
        model: String,
        /// Global batches per run.
        #[arg(long, default_value_t = 1500)]
        steps: u64,
        /// Global batch.
        #[arg(long, default_value_t = 64)]
        batch: usize,
        /// `[data] serve_max_mbps` values to try.
        #[arg(long, value_delimiter = ',', default_values_t = [50.0, 200.0, 1000.0])]
        mbps: Vec<f64>,
        /// Runs per cap.
        #[arg(long, default_value_t = 2)]
        repeats: usize,
        /// Seconds into the run the new worker starts.
        #[arg(long, default_value_t = 8.0)]
        join_after_s: f64,
        /// Output folder.
        #[arg(long, default_value = "results/data-join")]
        out: PathBuf,
    },
    /// Screenshots of the status server's dashboard over a running swarm with a cheater
    /// (headless Chromium), for the README.
    Dashboard {
        /// Rounds before the screenshots.
        #[arg(long, default_value_t = 60)]
        after_steps: u64,
        /// Output folder.
        #[arg(long, default_value = "results/dashboard")]
        out: PathBuf,
    },
    /// Honest training alone and beside a flood of connections and junk datagrams.
    Flood {
        /// Rounds per run.
        #[arg(long, default_value_t = 200)]
        rounds: u64,
        /// Connection attempts per second.
        #[arg(long, default_value_t = 200)]
        conns_per_s: u64,
        /// Junk datagrams per second.
        #[arg(long, default_value_t = 5000)]
        udp_per_s: u64,
        /// Alone/flooded pairs of runs (alternating).
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        /// Output folder.
        #[arg(long, default_value = "results/flood")]
        out: PathBuf,
    },
    /// The flooder of `flood` (runs until killed).
    #[command(hide = true)]
    Flooder {
        /// Join string of the run to flood.
        #[arg(long)]
        join: String,
        /// Connection attempts per second.
        #[arg(long)]
        conns_per_s: u64,
        /// Junk datagrams per second.
        #[arg(long)]
        udp_per_s: u64,
    },
    /// Spot checks: detection per adversary and p, false positives, overhead, accuracy
    /// with 25% cheaters: CSV, Markdown and a PNG plot.
    Verify {
        /// Check probabilities, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "0.01,0.05,0.1,0.25")]
        ps: Vec<f64>,
        /// Trials per adversary and p.
        #[arg(long, default_value_t = 1000)]
        trials: usize,
        /// Honest results re-executed in the false-positive run (at least).
        #[arg(long, default_value_t = 10_000)]
        honest_checks: u64,
        /// Global batches of the accuracy runs.
        #[arg(long, default_value_t = 938)]
        batches: u64,
        /// Only the mixed-fleet rows (workers on two CPU capabilities): `mixed.md`.
        #[arg(long)]
        mixed_only: bool,
        /// Output folder.
        #[arg(long, default_value = "results/verify")]
        out: PathBuf,
    },
    /// Compute classes: distances between honest results of differently set-up CPUs, per
    /// model and codec, the recommended cross-class tolerance, and the portable mode's cost.
    Classes {
        /// Tasks per model and mode.
        #[arg(long, default_value_t = 8)]
        tasks: usize,
        /// Samples per micro-batch.
        #[arg(long, default_value_t = 16)]
        batch: usize,
        /// Output folder.
        #[arg(long, default_value = "results/classes")]
        out: PathBuf,
    },
    /// The child of `classes`: computes its tasks in this process's class.
    #[command(hide = true)]
    ClassTasks {
        /// Tasks per model and mode.
        #[arg(long)]
        tasks: usize,
        /// Samples per micro-batch.
        #[arg(long)]
        batch: usize,
        /// Data folder (Fashion-MNIST).
        #[arg(long, default_value = trainer::data::DEFAULT_DIR)]
        data_dir: PathBuf,
        /// Where to write the updates.
        #[arg(long)]
        out: PathBuf,
    },
    /// Language-model throughput: tch vs PyTorch eager, a one-worker swarm vs one process.
    LmBench {
        /// A Hugging Face config.json (default: 4 layers, width 256, vocabulary 256).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Windows per step.
        #[arg(long, default_value_t = 16)]
        batch: usize,
        /// Tokens per window.
        #[arg(long, default_value_t = 128)]
        seq: usize,
        /// Timed steps.
        #[arg(long, default_value_t = 10)]
        steps: u64,
        /// Untimed steps first.
        #[arg(long, default_value_t = 3)]
        warmup: u64,
        /// Threads of the tch / PyTorch comparison.
        #[arg(long, default_value_t = 2)]
        threads: usize,
        /// cpu or cuda.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Dense peak TFLOP/s of the GPU, for MFU.
        #[arg(long, default_value_t = 989.0)]
        peak_tflops: f64,
        /// Global batches of each one-worker swarm run (0: skip them).
        #[arg(long, default_value_t = 48)]
        swarm_batches: u64,
        /// Rounds of (single process, H = 1 swarm, H = 8 swarm), measured in turn; each
        /// swarm is compared with its round's single process, and the median is reported.
        #[arg(long, default_value_t = 3)]
        swarm_repeats: usize,
        /// Python with torch and transformers.
        #[arg(long, default_value = ".venv/bin/python")]
        python: PathBuf,
        /// Output folder.
        #[arg(long, default_value = "results/lm-bench")]
        out: PathBuf,
    },
    /// Training parity: tch in one process vs PyTorch (transformers Llama, AdamW) on the same
    /// weights and token windows.
    LmParity {
        /// The model (a Hugging Face config.json).
        #[arg(long, default_value = "configs/llama-demo.json")]
        config: PathBuf,
        /// Token shards.
        #[arg(long, default_value = "runs/shards/fortunes")]
        shards: PathBuf,
        /// Windows per step.
        #[arg(long, default_value_t = 16)]
        batch: usize,
        /// Tokens per window.
        #[arg(long, default_value_t = 128)]
        seq: usize,
        /// Steps.
        #[arg(long, default_value_t = 200)]
        steps: u64,
        /// AdamW learning rate.
        #[arg(long, default_value_t = 2e-3)]
        lr: f64,
        /// AdamW weight decay.
        #[arg(long, default_value_t = 0.01)]
        weight_decay: f64,
        /// Threads.
        #[arg(long, default_value_t = 2)]
        threads: usize,
        /// Python with torch and transformers.
        #[arg(long, default_value = ".venv/bin/python")]
        python: PathBuf,
        /// Output folder.
        #[arg(long, default_value = "results/lm-parity")]
        out: PathBuf,
    },
    /// Codecs and H on a real swarm, same samples per row: CSV, Markdown and a PNG plot.
    Sweep {
        /// Configurations, `codec:H`, comma-separated.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "fp32:1,int8:1,int4:1,sign1:1,topk:1,int8:8,int8:32,int4:32,sign1:32,topk:32,int4:64"
        )]
        runs: Vec<String>,
        /// Model: cnn, mlp, or llama (`configs/llama-demo.json` on the shards of `make demo-lm`).
        #[arg(long, default_value = "cnn")]
        model: String,
        /// Global batches per configuration.
        #[arg(long, default_value_t = 938)]
        batches: u64,
        /// Global batch size.
        #[arg(long, default_value_t = 64)]
        batch: usize,
        /// Worker processes.
        #[arg(long, default_value_t = 2)]
        workers: usize,
        /// Outer learning rate of DiLoCo rows (SGD).
        #[arg(long, default_value_t = 1.0)]
        outer_lr: f64,
        /// Outer Nesterov momentum of DiLoCo rows (0: none, then lr 1 averages the models).
        #[arg(long, default_value_t = 0.0)]
        outer_momentum: f64,
        /// Inner learning rate of DiLoCo rows (AdamW).
        #[arg(long, default_value_t = 1e-3)]
        inner_lr: f64,
        /// Downlink codec (fp32: lossless XOR deltas).
        #[arg(long, default_value = "fp32")]
        downlink: String,
        /// Seeds per configuration; accuracy is their mean.
        #[arg(long, default_value_t = 1)]
        seeds: u64,
        /// Output folder.
        #[arg(long, default_value = "results/sweep")]
        out: PathBuf,
    },
}

/// Counts live heap bytes (`experiments simulate` reports the core's memory per worker).
#[global_allocator]
static ALLOC: simulate::Counting = simulate::Counting;

fn main() -> Result<()> {
    trainer::runtime::init_logging();
    match Cli::parse().cmd {
        Cmd::Simulate {
            workers,
            rounds,
            seed,
            out,
        } => simulate::run(&simulate::Settings {
            ns: workers,
            rounds,
            seed,
            out,
        })?,
        Cmd::Fleet {
            workers,
            rounds,
            out,
        } => fleet::run(&fleet::Settings {
            workers,
            rounds,
            out,
        })?,
        Cmd::Stragglers {
            model,
            steps,
            batch,
            repeat,
            out,
        } => {
            let args = std::env::args().skip(2).collect::<Vec<_>>().join(" ");
            stragglers::run(&stragglers::Settings {
                model,
                steps,
                batch,
                repeat: repeat.max(1),
                out,
                args: if args.is_empty() {
                    args
                } else {
                    format!(" {args}")
                },
            })?
        }
        Cmd::Dashboard { after_steps, out } => {
            dashboard::run(&dashboard::Settings { after_steps, out })?
        }
        Cmd::DataJoin {
            model,
            steps,
            batch,
            mbps,
            repeats,
            join_after_s,
            out,
        } => data_join::run(&data_join::Settings {
            model,
            steps,
            batch,
            mbps,
            repeats,
            join_after_s,
            out,
        })?,
        Cmd::Flood {
            rounds,
            conns_per_s,
            udp_per_s,
            repeats,
            out,
        } => flood::run(&flood::Settings {
            rounds,
            conns_per_s,
            udp_per_s,
            repeats,
            out,
        })?,
        Cmd::Flooder {
            join,
            conns_per_s,
            udp_per_s,
        } => flood::flooder(&join, conns_per_s, udp_per_s)?,
        Cmd::Verify {
            ps,
            trials,
            honest_checks,
            batches,
            mixed_only,
            out,
        } => verify::run(&verify::Settings {
            ps,
            trials,
            honest_checks,
            batches,
            mixed_only,
            out,
        })?,
        Cmd::Classes { tasks, batch, out } => {
            classes::run(&classes::Settings { tasks, batch, out })?
        }
        Cmd::ClassTasks {
            tasks,
            batch,
            data_dir,
            out,
        } => classes::class_tasks(tasks, batch, &data_dir, &out)?,
        Cmd::Sweep {
            runs,
            model,
            batches,
            batch,
            workers,
            outer_lr,
            outer_momentum,
            inner_lr,
            downlink,
            seeds,
            out,
        } => sweep::run(&sweep::Sweep {
            seeds,
            runs,
            model,
            batches,
            batch,
            workers,
            outer_lr,
            outer_momentum,
            inner_lr,
            downlink,
            out,
        })?,
        Cmd::LmBench {
            config,
            batch,
            seq,
            steps,
            warmup,
            threads,
            device,
            peak_tflops,
            swarm_batches,
            swarm_repeats,
            python,
            out,
        } => lm_bench::run(&lm_bench::LmBench {
            config,
            batch,
            seq,
            steps,
            warmup,
            threads,
            device,
            peak_tflops,
            swarm_batches,
            swarm_repeats,
            python,
            out,
        })?,
        Cmd::LmParity {
            config,
            shards,
            batch,
            seq,
            steps,
            lr,
            weight_decay,
            threads,
            python,
            out,
        } => {
            lm_parity::run(&lm_parity::LmParity {
                config,
                shards,
                batch,
                seq,
                steps,
                lr,
                weight_decay,
                threads,
                python,
                out,
            })?;
        }
        Cmd::Baseline {
            epochs,
            batch,
            lr,
            seed,
            threads,
            data_dir,
            out,
        } => {
            trainer::runtime::set_threads(threads);
            let split = Dataset::load_split(&data_dir)?;
            let (train_set, test_set) = (TrainData::from(split.train), TrainData::from(split.test));
            let run = ReferenceRun {
                model: ModelSpec::Cnn,
                seed,
                batch,
                optimizer: OptimizerConfig {
                    lr,
                    ..Default::default()
                },
            };
            let spe = train_set.len().div_ceil(batch) as u64;
            let start = Instant::now();
            let mut epoch_start = Instant::now();
            let mut rows = Vec::new();
            train(&run, &train_set, epochs * spe, |step, _loss, net| {
                if (step + 1) % spe == 0 {
                    let secs = epoch_start.elapsed().as_secs_f64();
                    let e = trainer::evaluate(net, &test_set)?;
                    let epoch = (step + 1) / spe;
                    println!(
                        "epoch {epoch}: test accuracy {:.4}, loss {:.4}, {secs:.1} s",
                        e.accuracy, e.loss
                    );
                    rows.push(json!({"epoch": epoch, "test_acc": e.accuracy, "test_loss": e.loss, "epoch_s": secs}));
                    epoch_start = Instant::now();
                }
                Ok(())
            })?;
            let total = start.elapsed().as_secs_f64();
            if let Some(dir) = out.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let threads = tch::get_num_threads();
            std::fs::write(
                &out,
                serde_json::to_string_pretty(
                    &json!({"epochs": rows, "wall_s": total, "threads": threads, "batch": batch, "lr": lr, "seed": seed}),
                )?,
            )?;
            println!(
                "total {total:.1} s on {threads} threads; written to {}",
                out.display()
            );
        }
    }
    Ok(())
}
