//! `experiments sweep`: codecs and DiLoCo's H on a real swarm (a coordinator and worker
//! processes on loopback per configuration), every row on the same training samples. Writes
//! `sweep.csv`, `sweep.md` and `sweep.png` (test accuracy, or for the language model the
//! validation loss, against uplink bytes).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use plotters::prelude::*;

use crate::swarm;

/// Settings of a sweep.
pub struct Sweep {
    /// Configurations as `codec:H` (`[compression] codec`, `training.local_steps`).
    pub runs: Vec<String>,
    /// `cnn`, `mlp`, or `llama` (`configs/llama-demo.json` on the byte-level fortunes shards
    /// of `make demo-lm`, windows of 128 tokens).
    pub model: String,
    /// Global batches per configuration (the same samples for every row).
    pub batches: u64,
    /// Global batch size.
    pub batch: usize,
    /// Worker processes per configuration.
    pub workers: usize,
    /// Outer learning rate (SGD) of DiLoCo rows.
    pub outer_lr: f64,
    /// Outer Nesterov momentum of DiLoCo rows (0: none; with lr 1 the outer step is the
    /// average of the workers' models).
    pub outer_momentum: f64,
    /// Inner learning rate (AdamW) of DiLoCo rows.
    pub inner_lr: f64,
    /// Downlink codec.
    pub downlink: String,
    /// Seeds per configuration (1, 2, ...): accuracy is their mean.
    pub seeds: u64,
    /// Output folder.
    pub out: PathBuf,
}

/// One row of the table.
struct Row {
    codec: String,
    h: u32,
    up: u64,
    down: u64,
    /// Test accuracy (validation loss for the language model): mean over the seeds, and its
    /// standard deviation.
    acc: f64,
    acc_sd: f64,
    wall_s: f64,
}

/// The language model's config and shards (made by `make demo-lm`).
const LM_CONFIG: &str = "configs/llama-demo.json";
const LM_SHARDS: &str = "runs/shards/fortunes";

fn is_lm(s: &Sweep) -> bool {
    s.model == "llama"
}

/// The summary field a row reports, and its name in the table.
fn metric(s: &Sweep) -> (&'static str, &'static str) {
    if is_lm(s) {
        ("final_val_loss", "val loss")
    } else {
        ("final_test_acc", "test acc")
    }
}

fn config(s: &Sweep, codec: &str, h: u32, seed: u64) -> Result<String> {
    let optimizers = if h > 1 {
        format!(
            "[optimizer]\nkind = \"sgd\"\nlr = {}\nmomentum = {}\nnesterov = {}\n\n\
             [inner_optimizer]\nkind = \"adamw\"\nlr = {}\n\n",
            s.outer_lr,
            s.outer_momentum,
            s.outer_momentum > 0.0,
            s.inner_lr
        )
    } else if is_lm(s) {
        format!("[optimizer]\nkind = \"adamw\"\nlr = {}\n\n", s.inner_lr)
    } else {
        "[optimizer]\nkind = \"adam\"\nlr = 0.001\n\n".to_string()
    };
    let mut base = swarm::base_config(&s.model, s.batches, s.batch, h, s.workers, seed);
    if is_lm(s) {
        let abs = |p: &str| -> Result<String> { Ok(std::path::absolute(p)?.display().to_string()) };
        base = base.replace(
            "kind = \"llama\"\n",
            &format!("kind = \"llama\"\nconfig = \"{}\"\n", abs(LM_CONFIG)?),
        );
        base += &format!(
            "[data]\nshards = \"{}\"\nseq_len = 128\n\n",
            abs(LM_SHARDS)?
        );
    }
    // Spot checks are off: this table measures the codecs (a check with error feedback also
    // uploads an fp32 vector; see `experiments verify`). zstd compresses every payload, as
    // on a home link, so the bytes do not depend on how fast this machine's loopback is.
    Ok(format!(
        "{base}{optimizers}[compression]\ncodec = \"{codec}\"\nzstd_level = 1\nzstd_adaptive = false\n\n\
         [downlink]\ncodec = \"{}\"\nzstd_level = 1\nzstd_adaptive = false\n\n[verification]\np = 0.0\nnew_worker_p = 0.0\n",
        s.downlink
    ))
}

fn parse(run: &str) -> Result<(String, u32)> {
    let (codec, h) = run
        .split_once(':')
        .with_context(|| format!("{run:?}: a run is CODEC:H, e.g. int8:8"))?;
    Ok((
        codec.to_string(),
        h.parse().with_context(|| format!("{run:?}: H"))?,
    ))
}

/// Runs every configuration and writes the table and the plot.
pub fn run(s: &Sweep) -> Result<()> {
    std::fs::create_dir_all(&s.out)?;
    let mut rows = Vec::new();
    let mut n_params = 0u64;
    for r in &s.runs {
        let (codec, h) = parse(r)?;
        let mut accs = Vec::new();
        let (mut up, mut down, mut wall) = (0u64, 0u64, 0f64);
        for seed in 1..=s.seeds.max(1) {
            let dir = s.out.join("runs").join(format!("{codec}-h{h}-s{seed}"));
            let cfg = config(s, &codec, h, seed)?;
            let args = if is_lm(s) {
                vec![
                    "--data-dir".to_string(),
                    std::path::absolute(LM_SHARDS)?.display().to_string(),
                ]
            } else {
                Vec::new()
            };
            let done = swarm::run(&dir, &cfg, &vec![args; s.workers], &[])?;
            let sum = done.summary()?;
            n_params = done
                .events("start")
                .first()
                .and_then(|e| e["n_params"].as_u64())
                .unwrap_or(0);
            if sum["batches"].as_u64() != Some(s.batches) {
                bail!(
                    "{r}: trained on {} batches, not {}",
                    sum["batches"],
                    s.batches
                );
            }
            accs.push(sum[metric(s).0].as_f64().unwrap_or(f64::NAN));
            up += sum["bytes_in"].as_u64().unwrap_or(0);
            down += sum["bytes_out"].as_u64().unwrap_or(0);
            wall += sum["wall_s"].as_f64().unwrap_or(0.0);
        }
        let k = accs.len() as f64;
        let acc = accs.iter().sum::<f64>() / k;
        let acc_sd =
            (accs.iter().map(|a| (a - acc).powi(2)).sum::<f64>() / (k - 1.0).max(1.0)).sqrt();
        let row = Row {
            codec,
            h,
            up: up / accs.len() as u64,
            down: down / accs.len() as u64,
            acc,
            acc_sd,
            wall_s: wall / k,
        };
        println!(
            "{:>6} H={:<3} up {:>13} B  down {:>13} B  {} {:.4} (sd {:.4}, {} seeds)  {:.1} s",
            row.codec,
            row.h,
            row.up,
            row.down,
            metric(s).1,
            row.acc,
            row.acc_sd,
            accs.len(),
            row.wall_s
        );
        rows.push(row);
    }
    // Uncompressed synchronous fp32: every worker sends 4 bytes per parameter every batch.
    let raw = 4.0 * n_params as f64 * s.batches as f64 * s.workers as f64;
    let base = rows.iter().find(|r| r.codec == "fp32" && r.h == 1);
    let (base_up, base_acc) = base.map_or((f64::NAN, f64::NAN), |r| (r.up as f64, r.acc));
    let mut csv = String::from(
        "codec,h,bytes_up,bytes_down,up_vs_fp32_sync,up_vs_raw_fp32,metric,metric_sd,metric_delta,wall_s\n",
    );
    let (what, scale, unit) = if is_lm(s) {
        ("val loss", 1.0, "nats")
    } else {
        ("test acc", 100.0, "points")
    };
    let mut md = format!(
        "{} model, {} global batches of {} on {} workers (the same samples in every row), \
         downlink {}; H = 1 rows: {} on the coordinator; H > 1 rows: AdamW {} on the \
         workers, outer SGD lr {} momentum {}; written by `experiments sweep`. \"vs fp32 sync\" divides the fp32 H=1 row's \
         uplink bytes (zstd included) by the row's; \"vs raw\" divides 4 bytes x parameters x \
         batches x workers. {what}, bytes and time are means over {} seed(s) (± standard deviation).\n\n\
         | codec | H | uplink bytes | downlink bytes | vs fp32 sync | vs raw fp32 | {what} | Δ ({unit}) | wall s |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
        s.model,
        s.batches,
        s.batch,
        s.workers,
        s.downlink,
        if is_lm(s) {
            format!("AdamW {}", s.inner_lr)
        } else {
            "Adam 1e-3".to_string()
        },
        s.inner_lr,
        s.outer_lr,
        s.outer_momentum,
        s.seeds
    );
    for r in &rows {
        let rel = base_up / r.up.max(1) as f64;
        let vs_raw = raw / r.up.max(1) as f64;
        let delta = (r.acc - base_acc) * scale;
        csv += &format!(
            "{},{},{},{},{rel:.2},{vs_raw:.2},{:.4},{:.4},{delta:.2},{:.1}\n",
            r.codec, r.h, r.up, r.down, r.acc, r.acc_sd, r.wall_s
        );
        md +=
            &format!(
            "| {} | {} | {} | {} | {rel:.1}x | {vs_raw:.1}x | {:.4}{} | {delta:+.2} | {:.1} |\n",
            r.codec,
            r.h,
            r.up,
            r.down,
            r.acc,
            if s.seeds > 1 { format!(" ± {:.4}", r.acc_sd) } else { String::new() },
            r.wall_s
        );
    }
    std::fs::write(s.out.join("sweep.csv"), csv)?;
    std::fs::write(s.out.join("sweep.md"), &md)?;
    plot(&rows, what, &s.out.join("sweep.png"))?;
    println!("\n{md}\nwritten to {}", s.out.display());
    Ok(())
}

fn plot(rows: &[Row], what: &str, path: &Path) -> Result<()> {
    let root = BitMapBackend::new(path, (900, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let xmin = rows
        .iter()
        .map(|r| r.up.max(1) as f64)
        .fold(f64::MAX, f64::min)
        / 2.0;
    let xmax = rows.iter().map(|r| r.up as f64).fold(1.0, f64::max) * 2.0;
    let ymin = rows.iter().map(|r| r.acc).fold(f64::MAX, f64::min) - 0.02;
    let ymax = rows.iter().map(|r| r.acc).fold(f64::MIN, f64::max) + 0.02;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("{what} vs uplink bytes"), ("sans-serif", 24))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d((xmin..xmax).log_scale(), ymin..ymax)?;
    chart
        .configure_mesh()
        .x_desc("uplink bytes (log)")
        .y_desc(what)
        .x_label_formatter(&|x| format!("{x:.0e}"))
        .draw()?;
    let hs: Vec<u32> = {
        let mut v: Vec<u32> = rows.iter().map(|r| r.h).collect();
        v.sort_unstable();
        v.dedup();
        v
    };
    for (k, h) in hs.iter().enumerate() {
        let color = Palette99::pick(k).to_rgba();
        let pts: Vec<(f64, f64, String)> = rows
            .iter()
            .filter(|r| r.h == *h)
            .map(|r| (r.up as f64, r.acc, r.codec.clone()))
            .collect();
        chart
            .draw_series(pts.iter().map(|(x, y, name)| {
                EmptyElement::at((*x, *y))
                    + Circle::new((0, 0), 5, color.filled())
                    + Text::new(name.clone(), (7, -7), ("sans-serif", 14))
            }))?
            .label(format!("H = {h}"))
            .legend(move |(x, y)| Circle::new((x, y), 5, color.filled()));
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE)
        .draw()?;
    root.present()?;
    Ok(())
}
