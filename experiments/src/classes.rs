//! `experiments classes`: how far honest results of different compute classes lie apart,
//! which settings make them bitwise equal, and what the portable mode costs.
//!
//! Each class is this machine run with other settings in the environment of a child process
//! (`experiments class-tasks`), since libtorch, MKL and oneDNN read them once at start:
//! libtorch's kernel capability, MKL's code path, oneDNN's instruction set, the thread count,
//! and the portable mode. Every child computes the same tasks (MLP, CNN, a small Llama; one
//! gradient and four AdamW inner steps) from the same parameters and samples; the parent
//! encodes each raw update with every codec (the encoder is plain Rust, so equal inputs give
//! equal bytes) and measures the relative L2 distance of the decoded update to the
//! reference class's. The recommended cross-class tolerance is the smallest power of ten
//! at least five times the largest distance measured.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use compression::{CodecConfig, CodecKind};
use executor::{encode_update, Executor};
use serde::{Deserialize, Serialize};
use trainer::tokens::TokenWindows;
use trainer::{Dataset, LlamaConfig, ModelSpec, Net, OptimizerConfig, OptimizerKind, TrainData};

/// Settings of the experiment.
pub struct Settings {
    /// Tasks per model and mode.
    pub tasks: usize,
    /// Samples per task (micro-batch).
    pub batch: usize,
    /// Output folder.
    pub out: PathBuf,
}

/// The classes compared: a name and the environment of its child (threads in `T`).
const CLASSES: [(&str, &[(&str, &str)]); 7] = [
    ("native t1", &[]),
    (
        "ATEN_CPU_CAPABILITY=default",
        &[("ATEN_CPU_CAPABILITY", "default")],
    ),
    ("MKL_CBWR=COMPATIBLE", &[("MKL_CBWR", "COMPATIBLE")]),
    (
        "ONEDNN_MAX_CPU_ISA=SSE41",
        &[("ONEDNN_MAX_CPU_ISA", "SSE41")],
    ),
    ("native t2", &[("T", "2")]),
    ("portable", &executor::class::PORTABLE_ENV),
    ("portable rerun", &executor::class::PORTABLE_ENV),
];

const MODELS: [&str; 3] = ["mlp", "cnn", "llama"];
const CODECS: [CodecKind; 5] = [
    CodecKind::Fp32,
    CodecKind::Int8,
    CodecKind::Int4,
    CodecKind::Sign1,
    CodecKind::TopK,
];

/// The raw updates one class computed, by model, mode and task.
#[derive(Serialize, Deserialize)]
struct ClassOutput {
    /// The class as the process declares it.
    label: String,
    /// `updates[model][mode][task]` (mode 0: one gradient, 1: four inner steps).
    updates: Vec<Vec<Vec<Vec<f32>>>>,
    /// Milliseconds of compute per model (all its tasks).
    ms: Vec<f64>,
}

/// A small Llama (2 layers, width 64, byte vocabulary): the bench model, narrower.
fn llama() -> ModelSpec {
    ModelSpec::Llama(Box::new(LlamaConfig {
        hidden_size: 64,
        intermediate_size: 172,
        num_hidden_layers: 2,
        num_key_value_heads: Some(2),
        max_position_embeddings: 64,
        ..crate::lm_bench::default_config()
    }))
}

fn model_and_data(name: &str, images: &Arc<TrainData>) -> (ModelSpec, Arc<TrainData>) {
    match name {
        "mlp" => (ModelSpec::Mlp, images.clone()),
        "cnn" => (ModelSpec::Cnn, images.clone()),
        _ => {
            use rand::{Rng, SeedableRng};
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
            let tokens = (0..32 * 4096 + 1).map(|_| rng.gen_range(0..256)).collect();
            let data = TrainData::Tokens(TokenWindows::new(tokens, 32, [0; 32]));
            (llama(), Arc::new(data))
        }
    }
}

/// The child: computes every task in this process's class and writes a [`ClassOutput`].
pub fn class_tasks(tasks: usize, batch: usize, data_dir: &Path, out: &Path) -> Result<()> {
    let threads = std::env::var("T")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(1);
    trainer::runtime::set_threads(Some(threads));
    let images: Arc<TrainData> = Arc::new(
        Dataset::load_idx(data_dir, "train")
            .context("Fashion-MNIST")?
            .into(),
    );
    let inner = OptimizerConfig {
        kind: OptimizerKind::AdamW,
        lr: 1e-3,
        ..OptimizerConfig::default()
    };
    let mut updates = Vec::new();
    let mut ms = Vec::new();
    for name in MODELS {
        let (spec, data) = model_and_data(name, &images);
        let params = Net::new(&spec, tch::Device::Cpu, 7).flat_params();
        let mut exec = Executor::new(&spec, tch::Device::Cpu, data.clone(), inner.clone());
        let t = Instant::now();
        let mut by_mode = Vec::new();
        for (micro, inner_steps) in [(1usize, false), (4, true)] {
            let mut by_task = Vec::new();
            for k in 0..tasks {
                let n = batch * micro;
                let indices: Vec<u32> = (0..n)
                    .map(|i| ((k * 7919 + i * 131) % data.len()) as u32)
                    .collect();
                let raw =
                    exec.compute(&params, &indices, &vec![batch as u32; micro], inner_steps)?;
                by_task.push(raw.values);
            }
            by_mode.push(by_task);
        }
        ms.push(t.elapsed().as_secs_f64() * 1e3);
        updates.push(by_mode);
    }
    let label = executor::class::detect(tch::Device::Cpu, threads as u32).label();
    std::fs::write(
        out,
        bincode::serialize(&ClassOutput { label, updates, ms })?,
    )?;
    Ok(())
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let d: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum();
    let n: f64 = b.iter().map(|&y| f64::from(y).powi(2)).sum();
    (d / n.max(1e-24)).sqrt()
}

fn decoded(values: &[f32], codec: CodecKind, seed: u64) -> Result<Vec<f32>> {
    let cfg = CodecConfig {
        codec,
        ..CodecConfig::default()
    };
    let enc = encode_update(values, None, &cfg, seed)?;
    Ok(compression::decode_exact(
        &enc.bytes,
        values.len(),
        &compression::DecodeLimits::default(),
    )?)
}

/// Runs the experiment: `classes.csv`, `classes.md` in `s.out`.
pub fn run(s: &Settings) -> Result<()> {
    std::fs::create_dir_all(&s.out)?;
    let exe = std::env::current_exe()?;
    let mut outputs = Vec::new();
    for (name, env) in CLASSES {
        let file = s.out.join("class.bin");
        let mut cmd = Command::new(&exe);
        cmd.args(["class-tasks", "--tasks", &s.tasks.to_string()])
            .args(["--batch", &s.batch.to_string()])
            .arg("--out")
            .arg(&file);
        for v in executor::class::CLASS_ENV_VARS {
            cmd.env_remove(v);
        }
        let status = cmd.envs(env.iter().copied()).status()?;
        if !status.success() {
            bail!("class {name}: the child failed ({status})");
        }
        let o: ClassOutput = bincode::deserialize(&std::fs::read(&file)?)?;
        std::fs::remove_file(&file)?;
        tracing::info!(class = name, declared = %o.label, ms = ?o.ms, "computed");
        outputs.push((name, o));
    }
    let reference = &outputs[0].1;
    let portable = outputs
        .iter()
        .find(|(n, _)| *n == "portable")
        .map(|(_, o)| o)
        .context("portable class")?;
    let mut csv = String::from("class,declared,model,mode,codec,bitwise_equal,max_rel_l2\n");
    let mut max_cross = 0f64;
    let mut per_codec = [0f64; CODECS.len()];
    let mut rows = Vec::new();
    for (name, o) in &outputs[1..] {
        // "portable, again" is compared with "portable": run to run, same settings.
        let base = if *name == "portable rerun" {
            portable
        } else {
            reference
        };
        let mut cells = Vec::new();
        for (mi, model) in MODELS.iter().enumerate() {
            for (mode_i, mode) in ["gradient", "4 inner steps"].iter().enumerate() {
                let (ours, theirs) = (&o.updates[mi][mode_i], &base.updates[mi][mode_i]);
                let equal = ours.iter().zip(theirs).all(|(a, b)| {
                    a.iter()
                        .map(|x| x.to_bits())
                        .eq(b.iter().map(|x| x.to_bits()))
                });
                let mut worst_codec = 0f64;
                for (ci, codec) in CODECS.into_iter().enumerate() {
                    let mut worst = 0f64;
                    for (k, (a, b)) in ours.iter().zip(theirs).enumerate() {
                        let d =
                            rel_l2(&decoded(a, codec, k as u64)?, &decoded(b, codec, k as u64)?);
                        worst = worst.max(d);
                    }
                    csv += &format!(
                        "{name},{},{model},{mode},{codec:?},{equal},{worst:.3e}\n",
                        o.label
                    );
                    if !name.starts_with("portable") {
                        max_cross = max_cross.max(worst);
                        per_codec[ci] = per_codec[ci].max(worst);
                    }
                    worst_codec = worst_codec.max(worst);
                }
                cells.push(if equal {
                    "equal".to_string()
                } else {
                    format!("{worst_codec:.1e}")
                });
            }
        }
        rows.push(format!("| {name} | {} |", cells.join(" | ")));
    }
    // The smallest power of ten at least 5x the largest distance.
    let recommend = |d: f64| 10f64.powf((5.0 * d).log10().ceil());
    let mut md = format!(
        "Honest results of one task computed in two classes: \"equal\" when every raw update \
         is bitwise equal to the reference class's (native kernels, 1 thread; \"portable rerun\" against \"portable\"), else the \
         largest relative L2 distance between decoded updates over the codecs fp32, int8, \
         int4, sign1 and top-k. {} tasks of {} samples per model and mode \
         (`experiments classes`).\n\n| class | {} |\n|---|{}\n{}\n",
        s.tasks,
        s.batch,
        MODELS
            .iter()
            .flat_map(|m| [format!("{m} gradient"), format!("{m} 4 inner steps")])
            .collect::<Vec<_>>()
            .join(" | "),
        "---|".repeat(2 * MODELS.len()),
        rows.join("\n")
    );
    let fp32 = per_codec[0];
    md += &format!(
        "\nLargest distance between classes: {max_cross:.2e} (decoded, any codec). Checks \
         across classes compare the values encoded (revealed for lossy codecs), so the fp32 \
         row sets the cross-class tolerance: largest {fp32:.2e}, recommended \
         `[verification] tolerance` {:.0e} (margin {:.0}x). The other rows are for the \
         tolerance mode within a class, which compares decoded updates.\n",
        recommend(fp32),
        recommend(fp32) / fp32.max(1e-30)
    );
    md += "\nBy codec (largest distance over models, modes and classes):\n\n| codec | largest distance | recommended tolerance |\n|---|---|---|\n";
    for (ci, codec) in CODECS.iter().enumerate() {
        md += &format!(
            "| {codec:?} | {:.2e} | {:.0e} |\n",
            per_codec[ci],
            recommend(per_codec[ci])
        );
    }
    md += "\nCompute per model, all tasks (ms): portable vs native, 1 thread:\n\n| model | native | portable | ratio |\n|---|---|---|---|\n";
    for (mi, model) in MODELS.iter().enumerate() {
        md += &format!(
            "| {model} | {:.0} | {:.0} | {:.2} |\n",
            reference.ms[mi],
            portable.ms[mi],
            portable.ms[mi] / reference.ms[mi]
        );
    }
    std::fs::write(s.out.join("classes.csv"), csv)?;
    std::fs::write(s.out.join("classes.md"), &md)?;
    println!("{md}");
    Ok(())
}
