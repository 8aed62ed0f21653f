//! `experiments lm-parity`: the same language model, initial weights and token windows
//! trained for N steps by tch in one process (the reference loop every swarm is compared
//! with) and by PyTorch (`transformers.LlamaForCausalLM` with `torch.optim.AdamW`,
//! `scripts/train_parity.py`). Writes the loss curves (`lm-parity.csv`) and a table
//! (`lm-parity.md`) with both final losses (mean of the last 10 steps).

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};
use trainer::reference::{train, ReferenceRun};
use trainer::schedule::BatchSchedule;
use trainer::tokens::TokenWindows;
use trainer::{LlamaConfig, ModelSpec, Net, OptimizerConfig, OptimizerKind, TrainData};

/// Settings.
pub struct LmParity {
    /// The model (a Hugging Face config.json).
    pub config: PathBuf,
    /// Token shards (`coordinator data prepare`).
    pub shards: PathBuf,
    /// Windows per step.
    pub batch: usize,
    /// Tokens per window.
    pub seq: usize,
    /// Steps.
    pub steps: u64,
    /// AdamW learning rate.
    pub lr: f64,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// Threads of both.
    pub threads: usize,
    /// Python with torch and transformers.
    pub python: PathBuf,
    /// Output folder.
    pub out: PathBuf,
}

fn mean_last(v: &[f64], k: usize) -> f64 {
    let tail = &v[v.len().saturating_sub(k)..];
    tail.iter().sum::<f64>() / tail.len().max(1) as f64
}

/// Runs both and writes the files; returns (tch, PyTorch) final losses.
pub fn run(s: &LmParity) -> Result<(f64, f64)> {
    std::fs::create_dir_all(&s.out)?;
    let c = LlamaConfig::from_file(&s.config).map_err(anyhow::Error::msg)?;
    let spec = ModelSpec::Llama(Box::new(c.clone()));
    let (train_set, _) = TokenWindows::load(&s.shards, s.seq, c.vocab_size)?;
    let data = TrainData::Tokens(train_set);
    let seed = 0;
    // The initial weights and the windows, in step order, for PyTorch.
    let init = s.out.join("init");
    std::fs::create_dir_all(&init)?;
    let net = Net::new(&spec, tch::Device::Cpu, seed);
    let meta = [("format".to_string(), "pt".to_string())]
        .into_iter()
        .collect();
    trainer::export::write_safetensors(
        &init.join("model.safetensors"),
        &net.layout(),
        &net.flat_params(),
        meta,
    )?;
    std::fs::write(
        init.join("config.json"),
        serde_json::to_vec_pretty(&c.hf_config_json())?,
    )?;
    let mut schedule = BatchSchedule::new(data.len(), s.batch, seed);
    let mut windows: Vec<u8> = Vec::new();
    for step in 0..s.steps {
        let (xs, ys) = data.batch(&schedule.batch(step))?;
        let xs: Vec<i64> = Vec::try_from(xs.view([-1]))?;
        let ys: Vec<i64> = Vec::try_from(ys.view([-1]))?;
        for (x, y) in xs.chunks(s.seq).zip(ys.chunks(s.seq)) {
            for &t in x.iter().chain(y.last()) {
                windows.extend((t as u32).to_le_bytes());
            }
        }
    }
    let windows_path = s.out.join("windows.u32");
    std::fs::write(&windows_path, windows)?;
    // tch, one process.
    tch::set_num_threads(s.threads as i32);
    let run = ReferenceRun {
        model: spec,
        seed,
        batch: s.batch,
        optimizer: OptimizerConfig {
            kind: OptimizerKind::AdamW,
            lr: s.lr,
            weight_decay: s.weight_decay,
            ..OptimizerConfig::default()
        },
    };
    let mut tch_losses = Vec::new();
    train(&run, &data, s.steps, |_, loss, _| {
        tch_losses.push(loss);
        Ok(())
    })?;
    // PyTorch.
    let script = crate::script("train_parity.py");
    let csv = s.out.join("pytorch.csv");
    let out = Command::new(&s.python)
        .arg(&script)
        .arg("--model-dir")
        .arg(&init)
        .arg("--windows")
        .arg(&windows_path)
        .args(["--batch", &s.batch.to_string(), "--seq", &s.seq.to_string()])
        .args(["--steps", &s.steps.to_string(), "--lr", &s.lr.to_string()])
        .args(["--weight-decay", &s.weight_decay.to_string()])
        .args(["--threads", &s.threads.to_string(), "--optimizer", "adamw"])
        .arg("--out")
        .arg(&csv)
        .output()
        .with_context(|| format!("running {}", s.python.display()))?;
    if !out.status.success() {
        bail!(
            "{}: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let py_losses: Vec<f64> = std::fs::read_to_string(&csv)?
        .lines()
        .skip(1)
        .filter_map(|l| l.split(',').nth(1)?.trim().parse().ok())
        .collect();
    if py_losses.len() != tch_losses.len() {
        bail!(
            "PyTorch gave {} losses for {} steps",
            py_losses.len(),
            tch_losses.len()
        );
    }
    let mut rows = String::from("step,tch,pytorch\n");
    for (i, (a, b)) in tch_losses.iter().zip(&py_losses).enumerate() {
        rows += &format!("{},{a:.6},{b:.6}\n", i + 1);
    }
    std::fs::write(s.out.join("lm-parity.csv"), rows)?;
    let (a, b) = (mean_last(&tch_losses, 10), mean_last(&py_losses, 10));
    let first_gap = (tch_losses[0] - py_losses[0]).abs();
    let md = format!(
        "| trainer | first loss | final loss (mean of last 10 of {} steps) |\n| --- | --- | --- |\n\
         | tch, one process | {:.4} | {a:.4} |\n| PyTorch, transformers LlamaForCausalLM + torch.optim.AdamW | {:.4} | {b:.4} |\n\
         | difference | {first_gap:.2e} | {:.4} |\n",
        s.steps,
        tch_losses[0],
        py_losses[0],
        (a - b).abs()
    );
    std::fs::write(s.out.join("lm-parity.md"), &md)?;
    print!("{md}");
    Ok((a, b))
}
