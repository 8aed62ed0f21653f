//! `experiments stragglers`: do slow volunteers hold the swarm back?
//!
//! One honest worker at full speed trains the MLP alone, then beside 1, 3 and 10 workers
//! that are 2x, 10x and 300x slower (`--test-slowdown`: each task's compute time is
//! stretched by sleeping), and beside a burst of 20 new 300x-slower keys that join mid-run
//! (Sybils). Reported per run: wall time against the honest worker alone, final test
//! accuracy, and the slow workers' share of the samples.
//!
//! Volunteers run on machines of their own; here every process shares this machine's
//! cores. So that a slow worker's own compute and start-up do not take the fast worker's
//! CPU (which no remote volunteer could do), the slow workers and the Sybils run under
//! `SCHED_IDLE` ([`swarm::IDLE`]): they compute on what the fast worker and the coordinator
//! leave idle, which also makes them slower than their factor says. The coordinator's cost
//! of serving them (handshakes, probes, results, spot checks) stays in the figures.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::PathBuf;

use anyhow::Result;
use plotters::prelude::*;

use crate::swarm;

/// Settings of the experiment.
pub struct Settings {
    /// The model: `mlp` (a task's fixed cost dominates) or `cnn` (its compute does).
    pub model: String,
    /// Global batches per run.
    pub steps: u64,
    /// Global batch.
    pub batch: usize,
    /// Passes over every configuration (each row reports its run of median wall time).
    pub repeat: usize,
    /// Output folder.
    pub out: PathBuf,
    /// The command's arguments as typed (for the table's caption).
    pub args: String,
}

/// One run's figures.
#[derive(Clone)]
struct Row {
    /// Which pass over the configurations.
    pass: usize,
    label: String,
    slow: usize,
    factor: f64,
    wall_s: f64,
    acc: f64,
    slow_share: f64,
    /// The coordinator's CPU seconds.
    coord_cpu_s: f64,
    /// The machine's busy CPU seconds during the run (every process).
    machine_cpu_s: f64,
}

/// The share of samples computed by workers other than `w0` (the fast one; names are
/// reported as `name@device`).
fn slow_share(r: &swarm::Finished) -> f64 {
    let names: HashMap<String, String> = r
        .events("worker_joined")
        .iter()
        .filter_map(|e| {
            let w = e["worker"].as_str()?;
            Some((w.get(..16)?.to_string(), e["name"].as_str()?.to_string()))
        })
        .collect();
    let (mut slow, mut all) = (0.0, 0.0);
    for s in r.events("step") {
        for p in s["samples"].as_array().into_iter().flatten() {
            let n = p["samples"].as_f64().unwrap_or(0.0);
            all += n;
            let name = p["worker"].as_str().and_then(|w| names.get(w));
            if name.is_some_and(|n| n.split('@').next() != Some("w0")) {
                slow += n;
            }
        }
    }
    slow / all.max(1.0)
}

/// The run of median wall time (of an even count, the upper middle one).
fn middle<'a>(runs: impl Iterator<Item = &'a Row>) -> Option<&'a Row> {
    let mut v: Vec<&Row> = runs.collect();
    v.sort_by(|a, b| a.wall_s.total_cmp(&b.wall_s));
    v.get(v.len() / 2).copied()
}

/// Runs every configuration; writes `stragglers.csv`, `stragglers.md` and `stragglers.png`.
pub fn run(s: &Settings) -> Result<()> {
    std::fs::create_dir_all(&s.out)?;
    let cfg = format!(
        "[run]\noutput_dir = \"out\"\nseed = 0\nlisten = \"127.0.0.1:0\"\nresume = false\n\
         min_workers = 1\n\n[model]\nkind = \"{}\"\n\n[training]\nglobal_batch = {}\n\
         steps = {}\nthreads = 1\n\n[optimizer]\nkind = \"adam\"\nlr = 0.001\n",
        s.model, s.batch, s.steps
    );
    let worker = swarm::sibling("worker")?;
    let mut runs: Vec<(String, usize, f64, bool)> = vec![("alone".into(), 0, 1.0, false)];
    for factor in [2.0, 10.0, 300.0] {
        for slow in [1, 3, 10] {
            runs.push((format!("{slow} x {factor}x slower"), slow, factor, false));
        }
    }
    runs.push(("20 new 300x-slower keys mid-run".into(), 20, 300.0, true));
    // The machine's speed drifts: the fast worker alone runs first and last of each pass,
    // every configuration runs once a pass, and each row is its run of median wall time,
    // against the middle run alone.
    runs.push(("alone, again".into(), 0, 1.0, false));
    let mut all: Vec<Row> = Vec::new();
    let plan =
        (0..s.repeat).flat_map(|pass| runs.iter().enumerate().map(move |(i, r)| (pass, i, r)));
    for (pass, i, (label, slow, factor, burst)) in plan {
        let (label, slow, factor, burst) = (label.clone(), *slow, *factor, *burst);
        let dir = s.out.join(format!("runs/{pass}-{i}"));
        // `swarm::run` names them w0 (the fast one), w1, ...
        let mut workers = vec![Vec::new()];
        let mut sidecars = Vec::new();
        if burst {
            // The burst: 20 new keys, a few seconds into the run.
            let keys = std::path::absolute(&dir)?.join("sybil");
            let script = format!(
                "sleep 5; mkdir -p {k}; for i in $(seq 1 20); do {idle} {w} --join '{{join}}' --threads 1 \
                 --device cpu --retry-for 5 --name s$i --key {k}/s$i.key --test-slowdown {factor} \
                 --data-dir {d} \
                 >/dev/null 2>&1 & done; wait",
                idle = swarm::IDLE_COMMAND.join(" "),
                k = keys.display(),
                w = worker.display(),
                d = trainer::data::DEFAULT_DIR,
            );
            sidecars.push(vec!["bash".to_string(), "-c".to_string(), script]);
        } else {
            for _ in 0..slow {
                workers.push(vec![
                    "--test-slowdown".into(),
                    factor.to_string(),
                    swarm::IDLE.into(),
                ]);
            }
        }
        let r = swarm::run(&dir, &cfg, &workers, &sidecars)?;
        let sum = r.summary()?;
        let row = Row {
            pass,
            label,
            slow,
            factor,
            wall_s: sum["wall_s"].as_f64().unwrap_or(f64::NAN),
            acc: sum["final_test_acc"].as_f64().unwrap_or(f64::NAN),
            slow_share: slow_share(&r),
            coord_cpu_s: sum["cpu_s"].as_f64().unwrap_or(f64::NAN),
            machine_cpu_s: r.machine_cpu_s,
        };
        tracing::info!(pass, run = %row.label, wall_s = row.wall_s, acc = row.acc, share = row.slow_share, "done");
        all.push(row);
    }
    let rows: Vec<Row> = runs
        .iter()
        .filter_map(|(l, ..)| middle(all.iter().filter(|r| &r.label == l)).cloned())
        .collect();
    let alone_runs = all.iter().filter(|r| r.slow == 0).count();
    let alone = middle(all.iter().filter(|r| r.slow == 0)).map_or(f64::NAN, |r| r.wall_s);
    let alone_acc = rows[0].acc;
    let mut csv = std::fs::File::create(s.out.join("stragglers.csv"))?;
    writeln!(
        csv,
        "pass,run,slow_workers,slowdown,wall_s,vs_alone,test_acc,acc_diff_points,slow_share,coordinator_cpu_s,machine_cpu_s"
    )?;
    let mut md = format!(
        "{}, global batch {}, {} global batches, one fast honest worker (`experiments stragglers{}`); \
         {}, times against the middle of the {} runs alone ({alone:.1} s; of an even count, the upper \
         middle one); the slow workers and the Sybils under \
         `SCHED_IDLE` (volunteers compute on machines of their own: here they share its cores); \
         CPU: the coordinator's, and the whole machine's (every process) while the run went on.\n\n\
         | run | wall | vs alone | test accuracy | vs alone (points) | slow workers' share of samples | coordinator CPU | machine CPU |\n|---|---:|---:|---:|---:|---:|---:|---:|\n",
        s.model.to_uppercase(), s.batch, s.steps, s.args,
        match s.repeat {
            1 => "one run of each row".to_string(),
            n => format!("each row its run of median wall time among {n} (one a pass over every row, passes in turn)"),
        },
        alone_runs
    );
    for r in &all {
        writeln!(
            csv,
            "{},{},{},{},{:.2},{:.3},{:.4},{:.2},{:.4},{:.2},{:.2}",
            r.pass,
            r.label,
            r.slow,
            r.factor,
            r.wall_s,
            r.wall_s / alone,
            r.acc,
            100.0 * (r.acc - alone_acc),
            r.slow_share,
            r.coord_cpu_s,
            r.machine_cpu_s
        )?;
    }
    for r in &rows {
        md.push_str(&format!(
            "| {} | {:.1} s | {:.2}x | {:.4} | {:+.2} | {:.1}% | {:.1} s | {:.1} s |\n",
            r.label,
            r.wall_s,
            r.wall_s / alone,
            r.acc,
            100.0 * (r.acc - alone_acc),
            100.0 * r.slow_share,
            r.coord_cpu_s,
            r.machine_cpu_s
        ));
    }
    std::fs::write(s.out.join("stragglers.md"), &md)?;
    plot(&rows, alone, &s.out.join("stragglers.png"))?;
    println!("{md}\nwritten to {}", s.out.display());
    Ok(())
}

fn plot(rows: &[Row], alone: f64, path: &std::path::Path) -> Result<()> {
    let root = BitMapBackend::new(path, (1000, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let ymax = rows.iter().map(|r| r.wall_s / alone).fold(1.2, f64::max) * 1.1;
    let mut chart = ChartBuilder::on(&root)
        .caption("run time vs the fast worker alone", ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(120)
        .y_label_area_size(60)
        .build_cartesian_2d((0..rows.len()).into_segmented(), 0.0..ymax)?;
    chart
        .configure_mesh()
        .y_desc("wall time / alone")
        .x_label_formatter(&|x| match x {
            SegmentValue::CenterOf(i) => rows.get(*i).map_or(String::new(), |r| r.label.clone()),
            _ => String::new(),
        })
        .x_label_style(
            ("sans-serif", 11)
                .into_font()
                .transform(FontTransform::Rotate90),
        )
        .draw()?;
    chart.draw_series(rows.iter().enumerate().map(|(i, r)| {
        let color = if r.wall_s / alone <= 1.1 { BLUE } else { RED };
        Rectangle::new(
            [
                (SegmentValue::Exact(i), 0.0),
                (SegmentValue::Exact(i + 1), r.wall_s / alone),
            ],
            color.mix(0.6).filled(),
        )
    }))?;
    chart.draw_series(LineSeries::new(
        [
            (SegmentValue::Exact(0), 1.1),
            (SegmentValue::Exact(rows.len()), 1.1),
        ],
        BLACK.stroke_width(1),
    ))?;
    root.present()?;
    Ok(())
}
