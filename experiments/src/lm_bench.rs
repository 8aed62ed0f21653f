//! `experiments lm-bench`: throughput of the language model.
//!
//! * tch in one process (the training loop of `trainer::reference`: gradient, the plain-Rust
//!   optimizer over the flat vector) against PyTorch eager (`transformers` Llama,
//!   `torch.optim.AdamW`) on the same model, batch and threads
//!   (`scripts/bench_lm_pytorch.py`);
//! * on a GPU also tch with the optimizer on the device (libtorch's AdamW), the compute a
//!   worker's inner loop could reach, and MFU;
//! * a swarm of one worker process (H = 1 and H = 8, fp32 both ways, checks off) against the
//!   tch single process at one thread over as many batches (both rates are all tokens over
//!   all the time): what the coordinator, the wire and the per-round work cost;
//!   `swarm_repeats` rounds of the three, each ratio within its round, the median reported.
//!
//! MFU uses the PaLM appendix's count: `6 * N_matmul + 12 * L * d * T` FLOP per token
//! (N_matmul: parameters in matrix products, so the input embedding is left out unless tied).
//! Writes `lm-bench.json` and `lm-bench.md`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use tch::Device;
use trainer::schedule::BatchSchedule;
use trainer::tokens::{write_synthetic, TokenWindows};
use trainer::{gradient, LlamaConfig, ModelSpec, Net, Optimizer, OptimizerConfig, TrainData};

use crate::stats::median;
use crate::swarm;

/// Settings.
pub struct LmBench {
    /// A Hugging Face config.json (`None`: the built-in CPU bench model).
    pub config: Option<PathBuf>,
    /// Windows per step.
    pub batch: usize,
    /// Tokens per window.
    pub seq: usize,
    /// Timed steps.
    pub steps: u64,
    /// Untimed steps first.
    pub warmup: u64,
    /// CPU threads of the tch / PyTorch comparison.
    pub threads: usize,
    /// `cpu` or `cuda`.
    pub device: String,
    /// Dense peak of the device in TFLOP/s, for MFU (GPU only).
    pub peak_tflops: f64,
    /// Global batches of each swarm run (0: no swarm runs).
    pub swarm_batches: u64,
    /// Rounds of (single process, H = 1 swarm, H = 8 swarm) measured in turn: each swarm
    /// is compared with the single process of its round (the machine's speed drifts
    /// between runs), and the median ratio is reported.
    pub swarm_repeats: usize,
    /// Python with torch and transformers.
    pub python: PathBuf,
    /// Output folder.
    pub out: PathBuf,
}

/// The CPU bench model: 4 layers, width 256, 4 heads, vocabulary 256 (3.4M parameters).
pub(crate) fn default_config() -> LlamaConfig {
    LlamaConfig {
        vocab_size: 256,
        hidden_size: 256,
        intermediate_size: 688,
        num_hidden_layers: 4,
        num_attention_heads: 4,
        num_key_value_heads: Some(4),
        max_position_embeddings: 1024,
        rope_theta: 10_000.0,
        rms_norm_eps: 1e-5,
        tie_word_embeddings: false,
        head_dim: None,
        hidden_act: None,
        rope_scaling: None,
        rope_parameters: None,
        attention_bias: None,
        mlp_bias: None,
    }
}

/// FLOP per token of a training step (PaLM appendix B).
fn flops_per_token(c: &LlamaConfig, seq: usize) -> f64 {
    let embed = if c.tie_word_embeddings {
        0
    } else {
        u64::from(c.vocab_size) * u64::from(c.hidden_size)
    };
    let n_mm = (c.n_params() - embed) as f64;
    6.0 * n_mm + 12.0 * f64::from(c.num_hidden_layers) * f64::from(c.hidden_size) * seq as f64
}

fn random_windows(c: &LlamaConfig, seq: usize, windows: usize) -> TrainData {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let tokens = (0..windows * seq + 1)
        .map(|_| rng.gen_range(0..c.vocab_size))
        .collect();
    TrainData::Tokens(TokenWindows::new(tokens, seq, [0; 32]))
}

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// The reference loop (flat vectors, Rust optimizer): the milliseconds of each of `steps`
/// timed steps (after `s.warmup` untimed ones).
fn tch_flat(
    s: &LmBench,
    spec: &ModelSpec,
    data: &TrainData,
    device: Device,
    steps: u64,
) -> Result<Vec<f64>> {
    let mut net = Net::new(spec, device, 0);
    let mut params = net.flat_params();
    let mut opt = Optimizer::new(OptimizerConfig {
        kind: trainer::OptimizerKind::AdamW,
        lr: 1e-4,
        ..OptimizerConfig::default()
    });
    let mut schedule = BatchSchedule::new(data.len(), s.batch, 0);
    let mut times = Vec::new();
    for step in 0..s.warmup + steps {
        let idx = schedule.batch(step);
        sync(device);
        let t = Instant::now();
        let g = gradient(&mut net, data, &idx)?;
        opt.step(&mut params, &g.grad)?;
        net.set_flat_params(&params)?;
        sync(device);
        if step >= s.warmup {
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    Ok(times)
}

/// Forward, backward and libtorch's AdamW with everything on the device: median step ms.
fn tch_device(s: &LmBench, spec: &ModelSpec, data: &TrainData, device: Device) -> Result<f64> {
    use tch::nn::OptimizerConfig as _;
    let net = Net::new(spec, device, 0);
    let mut opt = tch::nn::AdamW::default().build(net.var_store(), 1e-4)?;
    let mut schedule = BatchSchedule::new(data.len(), s.batch, 0);
    let mut times = Vec::new();
    for step in 0..s.warmup + s.steps {
        let (xs, ys) = data.batch(&schedule.batch(step))?;
        let (xs, ys) = (xs.to_device(device), ys.to_device(device));
        sync(device);
        let t = Instant::now();
        let loss = trainer::step::loss(&net.forward(&xs), &ys);
        opt.zero_grad();
        loss.backward();
        opt.step();
        sync(device);
        if step >= s.warmup {
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    Ok(median(&times))
}

fn pytorch(s: &LmBench, hf_config: &Path, threads: usize) -> Result<Value> {
    let script = crate::script("bench_lm_pytorch.py");
    let mut cmd = Command::new(&s.python);
    cmd.arg(&script)
        .arg("--config")
        .arg(hf_config)
        .args(["--batch", &s.batch.to_string(), "--seq", &s.seq.to_string()])
        .args([
            "--steps",
            &s.steps.to_string(),
            "--warmup",
            &s.warmup.to_string(),
        ])
        .args(["--threads", &threads.to_string(), "--device", &s.device])
        .args(["--peak-tflops", &s.peak_tflops.to_string()]);
    if s.device == "cuda" {
        cmd.arg("--bf16");
    }
    let out = cmd
        .output()
        .with_context(|| format!("running {}", s.python.display()))?;
    if !out.status.success() {
        bail!(
            "{}: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .last()
        .context("no output from the PyTorch bench")?;
    Ok(serde_json::from_str(line)?)
}

/// A one-worker swarm with `h` inner steps per round; tokens per second over its rounds
/// after the first.
fn swarm_rate(s: &LmBench, c: &LlamaConfig, shards: &Path, h: u32, repeat: usize) -> Result<f64> {
    // The run config lives in another folder: relative paths would resolve from there.
    let shards = std::path::absolute(shards)?;
    let llama = toml::to_string(c)?;
    let cfg = format!(
        "{}[model.llama]\n{llama}\n[data]\nshards = \"{}\"\nseq_len = {}\n\n\
         [optimizer]\nkind = \"adamw\"\nlr = 0.0001\n\n[inner_optimizer]\nkind = \"adamw\"\nlr = 0.0001\n\n\
         [compression]\ncodec = \"fp32\"\n\n[verification]\np = 0.0\nnew_worker_p = 0.0\n",
        swarm::base_config("llama", s.swarm_batches, s.batch, h, 1, 0)
            .replace("[workers]\ndeterministic_threads = 1\n", "[workers]\n"),
        shards.display(),
        s.seq
    );
    let dir = s.out.join("runs").join(format!("swarm-h{h}-{repeat}"));
    let data_dir = vec!["--data-dir".to_string(), shards.display().to_string()];
    let done = swarm::run(&dir, &cfg, &[data_dir], &[])?;
    let steps = done.events("step");
    if steps.len() < 3 {
        bail!("swarm run of H = {h}: too few rounds ({})", steps.len());
    }
    let t = |e: &Value| e["wall_s"].as_f64().unwrap_or(0.0);
    let tokens: u64 = steps[1..]
        .iter()
        .map(|e| e["tokens"].as_u64().unwrap_or(0))
        .sum();
    Ok(tokens as f64 / (t(steps[steps.len() - 1]) - t(steps[0])))
}

/// Runs the benchmark and writes the files.
pub fn run(s: &LmBench) -> Result<()> {
    std::fs::create_dir_all(&s.out)?;
    let c = match &s.config {
        Some(p) => LlamaConfig::from_file(p).map_err(anyhow::Error::msg)?,
        None => default_config(),
    };
    if s.seq > c.max_position_embeddings as usize {
        bail!("--seq {} is over max_position_embeddings", s.seq);
    }
    let hf_config = s.out.join("config.json");
    std::fs::write(&hf_config, serde_json::to_vec_pretty(&c.hf_config_json())?)?;
    let spec = ModelSpec::Llama(Box::new(c.clone()));
    let device = if s.device == "cuda" {
        let d = trainer::runtime::pick_device(true);
        if d == Device::Cpu {
            bail!("--device cuda but no usable GPU");
        }
        d
    } else {
        Device::Cpu
    };
    let tokens = (s.batch * s.seq) as f64;
    let fpt = flops_per_token(&c, s.seq);
    let data = random_windows(&c, s.seq, s.batch * 64);
    let mut rows = Vec::new();
    let mut report = |name: &str, threads: usize, ms: f64| {
        let tps = tokens / (ms / 1e3);
        let mfu = (device != Device::Cpu).then(|| fpt * tps / (s.peak_tflops * 1e12));
        println!("{name:<44} threads {threads:>2}: {ms:>9.1} ms/step {tps:>10.0} tokens/s");
        rows.push(json!({"what": name, "threads": threads, "step_ms": ms, "tokens_per_s": tps, "mfu": mfu}));
        tps
    };
    tch::set_num_threads(s.threads as i32);
    let tch_flat_tps = report(
        "tch, flat vectors + Rust AdamW (reference loop)",
        s.threads,
        median(&tch_flat(s, &spec, &data, device, s.steps)?),
    );
    if device != Device::Cpu {
        report(
            "tch, libtorch AdamW on the device",
            s.threads,
            tch_device(s, &spec, &data, device)?,
        );
    }
    let py = pytorch(s, &hf_config, s.threads)?;
    let py_tps = py["tokens_per_s"].as_f64().unwrap_or(f64::NAN);
    report(
        "PyTorch eager, transformers LlamaForCausalLM",
        s.threads,
        py["step_ms_median"].as_f64().unwrap_or(f64::NAN),
    );
    let mut swarm_rows = Vec::new();
    if s.swarm_batches > 0 && device == Device::Cpu {
        tch::set_num_threads(1);
        let shards = s.out.join("shards");
        let n_tokens = (s.swarm_batches as usize + 2) * s.batch * s.seq * 2;
        write_synthetic(&shards, n_tokens, 3)?;
        const HS: [u32; 2] = [1, 8];
        // Per H: (swarm tokens/s, its round's single-process tokens/s).
        let mut runs: [Vec<(f64, f64)>; 2] = Default::default();
        for repeat in 0..s.swarm_repeats.max(1) {
            // Over as many batches as a swarm run, and as a swarm's rate is taken: all the
            // time over all the tokens (a median would leave the slow steps out).
            let ms = tch_flat(s, &spec, &data, Device::Cpu, s.swarm_batches)?;
            let single = tokens / (ms.iter().sum::<f64>() / ms.len().max(1) as f64 / 1e3);
            for (i, h) in HS.into_iter().enumerate() {
                let rate = swarm_rate(s, &c, &shards, h, repeat)?;
                println!(
                    "swarm, 1 worker, H = {h:<2}: {rate:>8.0} tokens/s = {:.3}x the single process at 1 thread ({single:.0}) [round {}]",
                    rate / single,
                    repeat + 1
                );
                runs[i].push((rate, single));
            }
        }
        for (h, r) in HS.into_iter().zip(runs) {
            let ratios: Vec<f64> = r.iter().map(|(rate, single)| rate / single).collect();
            // The round whose ratio is the median (of an even count, the upper middle one):
            // its two rates are the ones shown.
            let mut order: Vec<usize> = (0..r.len()).collect();
            order.sort_by(|&a, &b| ratios[a].total_cmp(&ratios[b]));
            let (rate, single) = r[order[order.len() / 2]];
            swarm_rows.push(
                json!({"h": h, "tokens_per_s": rate, "single_tokens_per_s": single,
                "ratio": rate / single, "ratios": ratios}),
            );
        }
    }
    let ratio = tch_flat_tps / py_tps;
    println!("tch / PyTorch: {ratio:.3}x");
    let result = json!({"config": c.hf_config_json(), "n_params": c.n_params(), "batch": s.batch, "seq": s.seq,
        "device": s.device, "flops_per_token": fpt, "rows": rows, "pytorch": py,
        "tch_over_pytorch": ratio, "swarm": swarm_rows});
    std::fs::write(
        s.out.join("lm-bench.json"),
        serde_json::to_string_pretty(&result)?,
    )?;
    let mut md =
        "| what | threads | ms / step | tokens / s | MFU |\n| --- | --- | --- | --- | --- |\n"
            .to_string();
    for r in result["rows"].as_array().into_iter().flatten() {
        md += &format!(
            "| {} | {} | {:.1} | {:.0} | {} |\n",
            r["what"].as_str().unwrap_or(""),
            r["threads"],
            r["step_ms"].as_f64().unwrap_or(0.0),
            r["tokens_per_s"].as_f64().unwrap_or(0.0),
            r["mfu"]
                .as_f64()
                .map_or("-".into(), |m| format!("{:.1}%", m * 100.0)),
        );
    }
    for r in &swarm_rows {
        let each: Vec<String> = r["ratios"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|x| format!("{:.3}", x.as_f64().unwrap_or(0.0)))
            .collect();
        md += &format!(
            "| swarm, 1 worker, H = {} (vs {:.0} tokens/s single process; median of {}: {}) | 1 | - | {:.0} ({:.3}x) | - |\n",
            r["h"],
            r["single_tokens_per_s"].as_f64().unwrap_or(0.0),
            each.len(),
            each.join(", "),
            r["tokens_per_s"].as_f64().unwrap_or(0.0),
            r["ratio"].as_f64().unwrap_or(0.0)
        );
    }
    std::fs::write(s.out.join("lm-bench.md"), &md)?;
    print!("{md}");
    Ok(())
}
