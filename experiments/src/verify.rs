//! `experiments verify`: how well spot checks catch cheaters, and what they cost.
//!
//! * Detection, for each adversary and probability p: a cheating worker's task stream with
//!   the coordinator's real check decisions (keyed draws, a fresh key per trial) and, for
//!   every checked task, the worker's real result (the worker crate's `Compute` with its
//!   adversary) re-executed by the coordinator's real check (`coordinator::checks::recheck`).
//!   In process: no network, and only checked tasks (and what an adversary's memory needs)
//!   are computed, so thousands of trials are affordable.
//! * False positives: a real swarm in which every result of honest worker processes is
//!   re-executed by the coordinator, with error feedback (reveals) and DiLoCo rounds.
//! * Overhead: real swarms at fixed p, re-execution time over the workers' compute time.
//! * Accuracy: real swarms with one cheater in four workers, against a clean run.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use compression::{CodecConfig, DecodeLimits};
use coordinator::checks::{recheck, Job, Verdict};
use executor::Executor;
use plotters::prelude::*;
use proto::{ParamsPayload, Task};
use rand::{Rng, RngCore, SeedableRng};
use trainer::{Dataset, ModelSpec, Net, OptimizerConfig, TrainData};
use verify::{Reputation, SpotCheckPolicy, WorkerKey};
use worker::adversary::{Adversary, Mode};
use worker::compute::Compute;

use crate::swarm;

/// Settings of the experiment.
pub struct Settings {
    /// Check probabilities.
    pub ps: Vec<f64>,
    /// Trials per adversary and p.
    pub trials: usize,
    /// Honest checks in the false-positive run (at least).
    pub honest_checks: u64,
    /// Global batches of the accuracy runs.
    pub batches: u64,
    /// Only the mixed-fleet rows (`mixed.md`).
    pub mixed_only: bool,
    /// Output folder.
    pub out: PathBuf,
}

/// Samples per task in the detection streams and the swarms (global batch / 4 workers).
const PART: usize = 16;

/// Detection statistics of one adversary at one p.
struct Detection {
    mode: Mode,
    p: f64,
    trials: usize,
    /// Tasks until detection of the caught trials.
    tasks: Vec<u64>,
    /// Checks that passed although the task was cheated on (should be none).
    missed_checks: u64,
}

impl Detection {
    fn within(&self, n: f64) -> f64 {
        self.tasks.iter().filter(|&&t| t as f64 <= n).count() as f64 / self.trials as f64
    }

    fn mean(&self) -> f64 {
        self.tasks.iter().sum::<u64>() as f64 / self.tasks.len().max(1) as f64
    }

    fn p95(&self) -> u64 {
        let mut t = self.tasks.clone();
        t.sort_unstable();
        t.get((t.len() as f64 * 0.95) as usize)
            .copied()
            .unwrap_or(0)
    }
}

/// The task stream of one worker: task `k` starts from parameters that move a little every
/// task (so an old model differs from the current one) and takes the next 16 samples.
struct Stream {
    start: Vec<f32>,
    direction: Vec<f32>,
    n_data: u32,
}

impl Stream {
    fn params(&self, k: u64) -> Vec<f32> {
        self.start
            .iter()
            .zip(&self.direction)
            .map(|(s, d)| s + 1e-3 * k as f32 * d)
            .collect()
    }

    fn task(&self, k: u64) -> (Task, Vec<f32>) {
        let params = self.params(k);
        let bytes = compression::encode(&params, &CodecConfig::lossless(), 0).expect("finite");
        let indices: Vec<u32> = (0..PART as u32)
            .map(|i| ((k as u32).wrapping_mul(PART as u32) + i) % self.n_data)
            .collect();
        let task = Task {
            task_id: k,
            step: k,
            params_version: k,
            params: ParamsPayload::Full(bytes.into()),
            params_hash: verify::hash_f32(&params),
            micro_batches: vec![indices.len() as u32],
            indices,
            prefetch: Vec::new(),
            seed: k,
            hyperparams: [0; 32],
            ef_base: 0,
            inner_steps: false,
            standing: Default::default(),
        };
        (task, params)
    }
}

fn detect(
    mode: Mode,
    p: f64,
    trials: usize,
    data: &Arc<TrainData>,
    stream: &Stream,
    checker: &mut Executor,
) -> Detection {
    let policy = SpotCheckPolicy {
        base_p: p,
        new_worker_p: p,
        trusted_after: 0,
    };
    let codec = CodecConfig::lossless();
    let limits = DecodeLimits::default();
    let cap = (10.0 / p).ceil() as u64;
    let mut d = Detection {
        mode,
        p,
        trials,
        tasks: Vec::new(),
        missed_checks: 0,
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(p.to_bits() ^ mode as u64);
    for _ in 0..trials {
        let mut key = [0u8; 32];
        rng.fill_bytes(&mut key);
        let run = [7u8; 32];
        let mut worker = Compute::new(
            &ModelSpec::Mlp,
            tch::Device::Cpu,
            data.clone(),
            WorkerKey::from_seed([9; 32]),
            run,
            codec.clone(),
            OptimizerConfig::default(),
        )
        .with_adversary(Some(Adversary::new(mode, 1.0)));
        let mut rep = Reputation::default();
        let mut last_computed = 0u64;
        for k in 1..=cap {
            if !policy.should_check(&rep, &key, k) {
                continue;
            }
            // What the adversary's memory needs: its first task (stale), the one before (copy).
            for need in [1, k - 1] {
                if need >= 1 && need < k && need > last_computed {
                    let _ = worker.run(stream.task(need).0, None);
                    last_computed = need;
                }
            }
            let (task, params) = stream.task(k);
            let Ok(result) = worker.run(task.clone(), None) else {
                continue;
            };
            last_computed = k;
            let job = Job::new(
                WorkerKey::from_seed([9; 32]).public(),
                0,
                Arc::new(params),
                coordinator::checks::Work {
                    indices: task.indices,
                    micro: task.micro_batches,
                    inner_steps: task.inner_steps,
                    seed: task.seed,
                },
                Arc::new(result),
                None,
                None,
                verify::ComputeClass::default(),
            );
            match recheck(checker, &job, &codec, &limits) {
                Verdict::Fail { .. } => {
                    d.tasks.push(k);
                    break;
                }
                Verdict::Pass(_) => {
                    rep.checks_passed += 1;
                    d.missed_checks += 1;
                }
                Verdict::Error(_) | Verdict::Unconfirmed(_) => {}
            }
        }
    }
    d
}

/// Workers in every swarm of this experiment.
const WORKERS: usize = 4;

/// A real swarm of four worker processes (the first ones running the adversaries named in
/// `cheaters`).
fn swarm_run(
    name: &str,
    s: &Settings,
    model: &str,
    batches: u64,
    h: u32,
    extra: &str,
    cheaters: &[&str],
) -> Result<swarm::Finished> {
    let workers = WORKERS;
    let cfg = format!(
        "{}[compression]\ncodec = \"int8\"\n\n{extra}",
        swarm::base_config(model, batches, PART * workers, h, workers, 1)
    );
    let args: Vec<Vec<String>> = (0..workers)
        .map(|i| match cheaters.get(i) {
            Some(m) => vec!["--test-adversary".to_string(), m.to_string()],
            None => Vec::new(),
        })
        .collect();
    swarm::run(&s.out.join("runs").join(name), &cfg, &args, &[])
}

fn policy_toml(p: f64, new_p: f64) -> String {
    format!("[verification]\np = {p}\nnew_worker_p = {new_p}\ntrusted_after = 20\n\n")
}

/// The kernels of another CPU on this machine (libtorch's portable capability).
const OTHER_CPU: &str = "env:ATEN_CPU_CAPABILITY=default";

/// The mixed fleet: half the workers compute with [`OTHER_CPU`]. False positives over at
/// least `honest_checks` re-executed honest results, then detection of each adversary that
/// computes with [`OTHER_CPU`] beside one honest worker of each class. Returns Markdown.
fn mixed_fleet(s: &Settings) -> Result<String> {
    let rounds = s.honest_checks.div_ceil(WORKERS as u64);
    let other = |i: usize| {
        if i.is_multiple_of(2) {
            vec![OTHER_CPU.to_string()]
        } else {
            Vec::new()
        }
    };
    let cfg = format!(
        "{}[compression]\ncodec = \"int8\"\n\n[optimizer]\nkind = \"sgd\"\nlr = 0.7\nmomentum = 0.9\n\
         nesterov = true\n\n{}",
        swarm::base_config("mlp", 2 * rounds, PART * WORKERS, 2, WORKERS, 1),
        policy_toml(1.0, 1.0)
    );
    let args: Vec<Vec<String>> = (0..WORKERS).map(other).collect();
    let r = swarm::run(&s.out.join("runs/honest-mixed"), &cfg, &args, &[])?;
    let sum = r.summary()?;
    let hows: Vec<&str> = r
        .events("check_passed")
        .iter()
        .filter_map(|e| e["how"].as_str())
        .collect();
    let across = hows.iter().filter(|h| !h.starts_with("bitwise")).count();
    // Relative L2 distances of the values encoded, between the other kernels' results and
    // their re-execution on this CPU's kernels.
    let mut dist: Vec<f64> = hows
        .iter()
        .filter_map(|h| {
            let d = if h.starts_with("across classes") {
                h.split("relative L2 ").nth(1)?
            } else {
                // Confirmed in its own class: "...; DISTANCE from CLASS".
                h.rsplit("; ").next()?
            };
            d.split(' ').next()?.parse().ok()
        })
        .collect();
    dist.sort_by(f64::total_cmp);
    let pct = |q: f64| {
        dist.get(((dist.len() as f64 - 1.0) * q) as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    let (checks, caught, abandoned) = (
        sum["checks"].as_u64().unwrap_or(0),
        sum["cheats_caught"].as_u64().unwrap_or(0),
        sum["checks_abandoned"].as_u64().unwrap_or(0),
    );
    println!("mixed fleet: {checks} checks ({across} across classes), {caught} accusations, {abandoned} abandoned");
    let mut md = format!(
        "\nMixed fleet (4 workers, 2 of them on libtorch's baseline kernels, \
         `ATEN_CPU_CAPABILITY=default`, the others and the checks on this CPU's AVX2 kernels; \
         int8 with error feedback, H = 2, every result checked): **{caught}** accusations and \
         {abandoned} abandoned checks over **{checks}** re-executed honest results, {across} of \
         them compared across classes. Their distances (values encoded, relative L2): median \
         {:.1e}, 99th percentile {:.1e}, largest {:.1e}, against the tolerance 1e-2.\n\n\
         | adversary on the other kernels | caught | honest workers accused |\n| --- | --- | --- |\n",
        pct(0.5),
        pct(0.99),
        pct(1.0)
    );
    const MODES: [&str; 5] = ["noise", "scaled", "sign-flip", "zero", "wrong-data"];
    for mode in MODES {
        let cfg = format!(
            "{}{}",
            swarm::base_config("mlp", 120, PART * 3, 1, 3, 1),
            policy_toml(0.2, 1.0)
        );
        let args = vec![
            vec![OTHER_CPU.to_string()],
            Vec::new(),
            vec![
                OTHER_CPU.to_string(),
                "--test-adversary".into(),
                mode.into(),
            ],
        ];
        let r = swarm::run(&s.out.join(format!("runs/mixed-{mode}")), &cfg, &args, &[])?;
        let sum = r.summary()?;
        let banned = sum["banned"].as_array().map_or(0, Vec::len);
        let accused = r
            .events("cheat_detected")
            .iter()
            .filter(|e| !e["reason"].as_str().unwrap_or("").contains("its own class"))
            .count();
        let caught = if banned >= 1 { "yes" } else { "no" };
        println!("mixed fleet, {mode}: banned {banned}");
        md += &format!(
            "| {mode} | {caught} | {} |\n",
            banned.saturating_sub(1) + accused
        );
    }
    Ok(md)
}

/// Runs everything and writes `verify.csv`, `verify.md` and `verify.png` (with
/// `mixed_only`, only `mixed.md`).
pub fn run(s: &Settings) -> Result<()> {
    std::fs::create_dir_all(&s.out)?;
    let mixed = mixed_fleet(s)?;
    std::fs::write(s.out.join("mixed.md"), &mixed)?;
    if s.mixed_only {
        println!("{mixed}");
        return Ok(());
    }
    tch::set_num_threads(1);
    let data = Arc::new(TrainData::from(Dataset::load_idx(
        std::path::Path::new(trainer::data::DEFAULT_DIR),
        "train",
    )?));
    let net = Net::new(&ModelSpec::Mlp, tch::Device::Cpu, 1);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let stream = Stream {
        start: net.flat_params(),
        direction: (0..net.n_params())
            .map(|_| rng.gen_range(-1.0..1.0))
            .collect(),
        n_data: data.len() as u32,
    };
    let mut checker = Executor::new(
        &ModelSpec::Mlp,
        tch::Device::Cpu,
        data.clone(),
        OptimizerConfig::default(),
    );

    let mut det = Vec::new();
    for mode in Mode::ALL {
        for &p in &s.ps {
            let d = detect(mode, p, s.trials, &data, &stream, &mut checker);
            println!(
                "{:>10} p={p:<5} caught {}/{} within 10/p, within 3/p {:.1}%, mean {:.1} tasks, p95 {}",
                mode.name(),
                d.tasks.len(),
                d.trials,
                100.0 * d.within(3.0 / p),
                d.mean(),
                d.p95()
            );
            det.push(d);
        }
    }

    // False positives: every result of honest workers re-executed (int8 with error feedback,
    // so checks include reveals; H = 2), until at least `honest_checks` checks.
    let rounds = s.honest_checks.div_ceil(WORKERS as u64);
    let fp = swarm_run(
        "honest-p1",
        s,
        "mlp",
        2 * rounds,
        2,
        &format!(
            "[optimizer]\nkind = \"sgd\"\nlr = 0.7\nmomentum = 0.9\nnesterov = true\n\n{}",
            policy_toml(1.0, 1.0)
        ),
        &[],
    )?;
    let fs = fp.summary()?;
    let (checks, caught, abandoned) = (
        fs["checks"].as_u64().unwrap_or(0),
        fs["cheats_caught"].as_u64().unwrap_or(0),
        fs["checks_abandoned"].as_u64().unwrap_or(0),
    );
    println!("honest: {checks} checks, {caught} false accusations, {abandoned} abandoned");

    // Overhead: the CNN at fixed p, re-execution over the workers' compute.
    let mut overhead = Vec::new();
    for &p in &s.ps {
        let r = swarm_run(
            &format!("overhead-p{p}"),
            s,
            "cnn",
            300,
            1,
            &policy_toml(p, p),
            &[],
        )?;
        let sum = r.summary()?;
        let frac = sum["verify_overhead"].as_f64().unwrap_or(f64::NAN);
        println!(
            "overhead at p={p}: {:.2}% of the workers' compute ({} checks)",
            100.0 * frac,
            sum["checks"]
        );
        overhead.push((p, frac, sum["checks"].as_u64().unwrap_or(0)));
    }

    // Accuracy: one cheater in four workers (25%), p = 0.1 (0.5 for new workers).
    let acc_of = |r: &swarm::Finished| -> Result<f64> {
        r.summary()?["final_test_acc"].as_f64().context("accuracy")
    };
    let clean = acc_of(&swarm_run(
        "clean",
        s,
        "mlp",
        s.batches,
        1,
        &policy_toml(0.1, 0.5),
        &[],
    )?)?;
    let mut accuracy = Vec::new();
    for mode in Mode::ALL {
        let r = swarm_run(
            &format!("cheater-{}", mode.name()),
            s,
            "mlp",
            s.batches,
            1,
            &policy_toml(0.1, 0.5),
            &[mode.name()],
        )?;
        let sum = r.summary()?;
        let banned = sum["banned"].as_array().map_or(0, Vec::len);
        let a = acc_of(&r)?;
        println!(
            "{:>10}: accuracy {a:.4} (clean {clean:.4}), banned {banned}",
            mode.name()
        );
        accuracy.push((mode, a, banned));
    }
    write(
        s,
        &det,
        (checks, caught, abandoned),
        &overhead,
        clean,
        &accuracy,
    )?;
    let md = std::fs::read_to_string(s.out.join("verify.md"))?;
    std::fs::write(s.out.join("verify.md"), md + &mixed)?;
    Ok(())
}

fn write(
    s: &Settings,
    det: &[Detection],
    honest: (u64, u64, u64),
    overhead: &[(f64, f64, u64)],
    clean: f64,
    accuracy: &[(Mode, f64, usize)],
) -> Result<()> {
    let mut csv = String::from(
        "adversary,p,trials,detection_rate,caught_within_3_over_p,mean_tasks_to_detection,p95_tasks,passed_cheated_checks\n",
    );
    let mut md = format!(
        "Written by `experiments verify` ({} trials per cell; MLP, {PART} samples per task; a \
         trial ends when the cheater is caught or after 10/p tasks).\n\n\
         A check of a cheated task always catches it, so tasks to detection follow the draws: \
         geometric with mean 1/p, caught within 3/p with probability 1 - (1 - p)^(3/p) \
         (\"expected\"), which is above 95% for every p.\n\n\
         | adversary | p | detection rate | caught within 3/p | expected | mean tasks to detection | 95th pct |\n\
         | --- | --- | --- | --- | --- | --- | --- |\n",
        s.trials
    );
    for d in det {
        csv += &format!(
            "{},{},{},{:.4},{:.4},{:.2},{},{}\n",
            d.mode.name(),
            d.p,
            d.trials,
            d.tasks.len() as f64 / d.trials as f64,
            d.within(3.0 / d.p),
            d.mean(),
            d.p95(),
            d.missed_checks
        );
        let expected = 1.0 - (1.0 - d.p).powf((3.0 / d.p).floor());
        md += &format!(
            "| {} | {} | {:.1}% | {:.1}% | {:.1}% | {:.1} | {} |\n",
            d.mode.name(),
            d.p,
            100.0 * d.tasks.len() as f64 / d.trials as f64,
            100.0 * d.within(3.0 / d.p),
            100.0 * expected,
            d.mean(),
            d.p95()
        );
    }
    let (checks, caught, abandoned) = honest;
    md += &format!(
        "\nFalse positives: **{caught}** accusations (and {abandoned} abandoned checks) over \
         **{checks}** re-executed results of honest worker processes (4 workers, int8 with \
         error feedback, DiLoCo H = 2, every result checked).\n\n\
         | p | re-execution / workers' compute | checks |\n| --- | --- | --- |\n"
    );
    for (p, frac, n) in overhead {
        md += &format!("| {p} | {:.2}% | {n} |\n", 100.0 * frac);
    }
    md += &format!(
        "\nOverhead: CNN, 4 workers, 300 rounds, int8, p fixed for every worker.\n\n\
         Accuracy with one cheater among four workers (25%), p = 0.1 (0.5 for new workers), \
         MLP, {} global batches of 64; clean run: **{clean:.4}**.\n\n\
         | adversary | test accuracy | vs clean (points) | banned |\n| --- | --- | --- | --- |\n",
        s.batches
    );
    for (m, a, banned) in accuracy {
        md += &format!(
            "| {} | {a:.4} | {:+.2} | {banned} |\n",
            m.name(),
            100.0 * (a - clean)
        );
    }
    std::fs::write(s.out.join("verify.csv"), csv)?;
    std::fs::write(s.out.join("verify.md"), &md)?;
    plot(det, &s.out.join("verify.png"))?;
    println!("\n{md}\nwritten to {}", s.out.display());
    Ok(())
}

fn plot(det: &[Detection], path: &std::path::Path) -> Result<()> {
    let root = BitMapBackend::new(path, (900, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let ps: Vec<f64> = det.iter().map(|d| d.p).collect();
    let (pmin, pmax) = (
        ps.iter().cloned().fold(1.0, f64::min),
        ps.iter().cloned().fold(0.0, f64::max),
    );
    let tmax = det
        .iter()
        .map(|d| d.mean())
        .fold(1.0, f64::max)
        .max(3.0 / pmin);
    let mut chart = ChartBuilder::on(&root)
        .caption("Tasks until a cheater is caught", ("sans-serif", 24))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(
            (pmin / 1.5..pmax * 1.5).log_scale(),
            (0.5..tmax * 2.0).log_scale(),
        )?;
    chart
        .configure_mesh()
        .x_desc("check probability p")
        .y_desc("mean tasks to detection")
        .x_label_formatter(&|x| format!("{x:.2}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()?;
    chart
        .draw_series(LineSeries::new(
            ps.iter().map(|&p| (p, 3.0 / p)),
            BLACK.stroke_width(1),
        ))?
        .label("3/p")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 15, y)], BLACK));
    for (k, mode) in Mode::ALL.iter().enumerate() {
        let color = Palette99::pick(k).to_rgba();
        let pts: Vec<(f64, f64)> = det
            .iter()
            .filter(|d| d.mode == *mode)
            .map(|d| (d.p, d.mean().max(0.6)))
            .collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
            .label(mode.name())
            .legend(move |(x, y)| Circle::new((x, y), 4, color.filled()));
        chart.draw_series(
            pts.iter()
                .map(|&(x, y)| Circle::new((x, y), 4, color.filled())),
        )?;
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE)
        .draw()?;
    root.present()?;
    Ok(())
}
