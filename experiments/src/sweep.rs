//! `experiments sweep`: codec x H on a real swarm (a coordinator and worker processes on
//! loopback per configuration), on the same number of training samples. Writes
//! `sweep.csv`, `sweep.md` and `sweep.png` (test accuracy against uplink bytes).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use plotters::prelude::*;
use serde_json::Value;

/// Settings of a sweep.
pub struct Sweep {
    /// Codec names (`[compression] codec`).
    pub codecs: Vec<String>,
    /// Values of H (`training.local_steps`).
    pub hs: Vec<u32>,
    /// `cnn` or `mlp`.
    pub model: String,
    /// Global batches per configuration (the same samples for every row).
    pub batches: u64,
    /// Global batch size.
    pub batch: usize,
    /// Worker processes per configuration.
    pub workers: usize,
    /// Output folder.
    pub out: PathBuf,
}

/// One row of the table.
struct Row {
    codec: String,
    h: u32,
    up: u64,
    down: u64,
    acc: f64,
    wall_s: f64,
}

fn sibling(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let p = exe.parent().context("exe folder")?.join(name);
    if !p.exists() {
        bail!(
            "{} is missing: build the workspace's binaries first",
            p.display()
        );
    }
    Ok(p)
}

fn config(s: &Sweep, codec: &str, h: u32, dir: &Path) -> String {
    let optimizers = if h > 1 {
        "[optimizer]\nkind = \"sgd\"\nlr = 0.7\nmomentum = 0.9\nnesterov = true\n\n\
         [inner_optimizer]\nkind = \"adamw\"\nlr = 0.001\n"
    } else {
        "[optimizer]\nkind = \"adam\"\nlr = 0.001\n"
    };
    format!(
        "[run]\noutput_dir = \"{}\"\nseed = 1\nlisten = \"127.0.0.1:0\"\nresume = false\nmin_workers = {}\n\n\
         [model]\nkind = \"{}\"\n\n[training]\nglobal_batch = {}\nsteps = {}\nlocal_steps = {h}\nthreads = 1\n\n\
         {optimizers}\n[compression]\ncodec = \"{codec}\"\nzstd_level = 1\n\n\
         [workers]\ndeterministic_threads = 1\n",
        dir.display(),
        s.workers,
        s.model,
        s.batch,
        s.batches
    )
}

fn run_one(s: &Sweep, codec: &str, h: u32) -> Result<Row> {
    // Absolute: the coordinator takes relative paths from the config file's folder.
    let dir = std::path::absolute(&s.out)?
        .join("runs")
        .join(format!("{codec}-h{h}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let cfg = dir.join("run.toml");
    std::fs::write(&cfg, config(s, codec, h, &dir))?;
    let log = std::fs::File::create(dir.join("coordinator.log"))?;
    let mut coord = Command::new(sibling("coordinator")?)
        .args(["run", "--config"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()?;
    let join_path = dir.join("join.txt");
    let start = Instant::now();
    while !join_path.exists() {
        if start.elapsed() > Duration::from_secs(60) {
            let _ = coord.kill();
            bail!("coordinator of {codec}-h{h} did not start");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let join = std::fs::read_to_string(&join_path)?.trim().to_string();
    let mut workers: Vec<Child> = (0..s.workers)
        .map(|i| {
            Command::new(sibling("worker")?)
                .args([
                    "--join",
                    &join,
                    "--threads",
                    "1",
                    "--device",
                    "cpu",
                    "--retry-for",
                    "30",
                ])
                .arg("--key")
                .arg(dir.join(format!("w{i}.key")))
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.join(format!("w{i}.log")))?)
                .spawn()
                .map_err(anyhow::Error::from)
        })
        .collect::<Result<_>>()?;
    let status = coord.wait()?;
    for w in &mut workers {
        let _ = w.kill();
        let _ = w.wait();
    }
    if !status.success() {
        bail!("coordinator of {codec}-h{h} failed; see {}", dir.display());
    }
    let summary: Value = std::fs::read_to_string(dir.join("metrics.jsonl"))?
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .rfind(|e| e["event"] == "summary")
        .context("no summary")?;
    Ok(Row {
        codec: codec.to_string(),
        h,
        up: summary["bytes_in"].as_u64().unwrap_or(0),
        down: summary["bytes_out"].as_u64().unwrap_or(0),
        acc: summary["final_test_acc"].as_f64().unwrap_or(0.0),
        wall_s: summary["wall_s"].as_f64().unwrap_or(0.0),
    })
}

/// Runs every configuration and writes the table and the plot.
pub fn run(s: &Sweep) -> Result<()> {
    std::fs::create_dir_all(&s.out)?;
    let mut rows = Vec::new();
    for h in &s.hs {
        for codec in &s.codecs {
            let r = run_one(s, codec, *h)?;
            println!(
                "{codec:>6} H={h:<3} up {:>12} B  down {:>12} B  acc {:.4}  {:.1} s",
                r.up, r.down, r.acc, r.wall_s
            );
            rows.push(r);
        }
    }
    let base = rows
        .iter()
        .find(|r| r.codec == "fp32" && r.h == 1)
        .map(|r| r.up as f64)
        .unwrap_or(f64::NAN);
    let base_acc = rows
        .iter()
        .find(|r| r.codec == "fp32" && r.h == 1)
        .map(|r| r.acc)
        .unwrap_or(f64::NAN);
    let mut csv = String::from(
        "codec,h,bytes_up,bytes_down,up_vs_fp32_sync,test_acc,acc_delta_points,wall_s\n",
    );
    let mut md = format!(
        "{} model, {} global batches of {} on {} workers (the same samples in every row); \
         `experiments sweep` writes this table.\n\n\
         | codec | H | uplink bytes | downlink bytes | uplink vs fp32 H=1 | test acc | Δ acc (points) | wall s |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- |\n",
        s.model, s.batches, s.batch, s.workers
    );
    for r in &rows {
        let rel = base / r.up.max(1) as f64;
        let delta = (r.acc - base_acc) * 100.0;
        csv += &format!(
            "{},{},{},{},{rel:.2},{:.4},{delta:.2},{:.1}\n",
            r.codec, r.h, r.up, r.down, r.acc, r.wall_s
        );
        md += &format!(
            "| {} | {} | {} | {} | {rel:.1}x fewer | {:.4} | {delta:+.2} | {:.1} |\n",
            r.codec, r.h, r.up, r.down, r.acc, r.wall_s
        );
    }
    std::fs::write(s.out.join("sweep.csv"), csv)?;
    std::fs::write(s.out.join("sweep.md"), &md)?;
    plot(&rows, &s.out.join("sweep.png"))?;
    println!("\n{md}\nwritten to {}", s.out.display());
    Ok(())
}

fn plot(rows: &[Row], path: &Path) -> Result<()> {
    let root = BitMapBackend::new(path, (900, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let xmin = rows
        .iter()
        .map(|r| r.up.max(1) as f64)
        .fold(f64::MAX, f64::min)
        / 2.0;
    let xmax = rows.iter().map(|r| r.up as f64).fold(1.0, f64::max) * 2.0;
    let ymin = rows.iter().map(|r| r.acc).fold(1.0, f64::min) - 0.02;
    let ymax = rows.iter().map(|r| r.acc).fold(0.0, f64::max) + 0.02;
    let mut chart = ChartBuilder::on(&root)
        .caption("Test accuracy vs uplink bytes", ("sans-serif", 24))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d((xmin..xmax).log_scale(), ymin..ymax)?;
    chart
        .configure_mesh()
        .x_desc("uplink bytes (log)")
        .y_desc("test accuracy")
        .draw()?;
    let hs: Vec<u32> = {
        let mut v: Vec<u32> = rows.iter().map(|r| r.h).collect();
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
