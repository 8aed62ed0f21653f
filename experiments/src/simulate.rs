//! `experiments simulate`: the coordinator's real round core ([`rounds::Core`]) driven by
//! virtual workers in virtual time. No sockets and no model: a worker's answer arrives after
//! its simulated network latency and compute time. The fleet has a spread of speeds, slow
//! stragglers, workers that leave mid-task and come back, workers that fall silent, and
//! cheaters that spot checks catch. For each fleet size N it measures the time spent inside
//! the core (one thread: the coordinator's CPU per round and per event) and the memory the
//! core holds per worker (a counting allocator), so that their growth with N shows.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use plotters::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rounds::{Action, Batches, Config, Core, Growth, Input, Phase, Valid};
use verify::{SpotCheckPolicy, WorkerId};

/// The system allocator, counting the bytes live (for the memory per worker).
pub struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged; only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        // SAFETY: same layout contract as the caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        // SAFETY: `p` came from `alloc` with this layout.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new as isize - l.size() as isize, Ordering::Relaxed);
        // SAFETY: as for `GlobalAlloc::realloc`.
        unsafe { System.realloc(p, l, new) }
    }
}

fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

/// What to simulate.
pub struct Settings {
    /// Fleet sizes.
    pub ns: Vec<usize>,
    /// Rounds per fleet.
    pub rounds: u64,
    /// Seed of the fleet and its behaviour.
    pub seed: u64,
    /// Output folder.
    pub out: PathBuf,
}

/// Samples per global batch (rounds grow with the workers: 16 samples per worker).
const GLOBAL_BATCH: usize = 64;
const MIN_MICRO: usize = 16;

/// Consecutive indices, `GLOBAL_BATCH` per batch (the data itself plays no part).
struct Seq;

impl Batches for Seq {
    fn batch(&self, index: u64) -> Vec<u32> {
        let s = GLOBAL_BATCH as u64;
        ((index * s) as u32..((index + 1) * s) as u32).collect()
    }
}

/// A virtual volunteer.
struct Volunteer {
    key: WorkerId,
    /// Compute milliseconds per sample.
    ms_per_sample: f64,
    /// One-way network latency, ms.
    latency_ms: f64,
    cheater: bool,
    conn: Option<u64>,
}

/// What happens at a virtual time.
enum Ev {
    Join(usize),
    Answer { conn: u64, task: u64, cheat: bool },
    Leave(u64),
    CheckDone { worker: WorkerId, caught: bool },
}

/// One fleet size's figures.
struct Row {
    n: usize,
    rounds: u64,
    events: u64,
    core_s: f64,
    bytes_per_worker: f64,
    virtual_round_ms: f64,
    tasks: u64,
    reassigned: u64,
    timeouts: u64,
    banned: usize,
}

impl Row {
    fn us_per_event(&self) -> f64 {
        self.core_s * 1e6 / self.events.max(1) as f64
    }
    fn events_per_s(&self) -> f64 {
        self.events as f64 / self.core_s.max(1e-9)
    }
    fn ms_per_round(&self) -> f64 {
        self.core_s * 1e3 / self.rounds.max(1) as f64
    }
}

/// Runs every fleet size; writes `simulate.csv`, `simulate.md` and `simulate.png`.
pub fn run(s: &Settings) -> Result<()> {
    std::fs::create_dir_all(&s.out)?;
    let mut rows = Vec::new();
    for &n in &s.ns {
        let row = fleet(n, s.rounds, s.seed);
        tracing::info!(
            n,
            us_per_event = row.us_per_event(),
            ms_per_round = row.ms_per_round(),
            bytes_per_worker = row.bytes_per_worker,
            "simulated"
        );
        rows.push(row);
    }
    let mut csv = std::fs::File::create(s.out.join("simulate.csv"))?;
    writeln!(csv, "workers,rounds,events,core_s,us_per_event,events_per_s,core_ms_per_round,bytes_per_worker,virtual_round_ms,tasks,reassigned,timeouts,banned")?;
    for r in &rows {
        writeln!(
            csv,
            "{},{},{},{:.4},{:.3},{:.0},{:.3},{:.0},{:.1},{},{},{},{}",
            r.n,
            r.rounds,
            r.events,
            r.core_s,
            r.us_per_event(),
            r.events_per_s(),
            r.ms_per_round(),
            r.bytes_per_worker,
            r.virtual_round_ms,
            r.tasks,
            r.reassigned,
            r.timeouts,
            r.banned
        )?;
    }
    let mut md = String::from(
        "| workers | core CPU per round | per event | events/s | core memory per worker | simulated round | tasks | reassigned | closed silent | cheaters banned |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in &rows {
        md.push_str(&format!(
            "| {} | {:.2} ms | {:.2} µs | {:.2e} | {:.0} B | {:.0} ms | {} | {} | {} | {} |\n",
            r.n,
            r.ms_per_round(),
            r.us_per_event(),
            r.events_per_s(),
            r.bytes_per_worker,
            r.virtual_round_ms,
            r.tasks,
            r.reassigned,
            r.timeouts,
            r.banned
        ));
    }
    if let (Some(a), Some(b)) = (rows.first(), rows.last()) {
        let k = (b.n as f64 / a.n as f64).ln();
        md.push_str(&format!(
            "\nFrom {} to {} workers: time per event x{:.2} (growth exponent {:.2}; 0 is O(1), 1 is O(N)), memory per worker x{:.2}, time per round x{:.0} (the round's work grows with its parts).\n",
            a.n,
            b.n,
            b.us_per_event() / a.us_per_event(),
            (b.us_per_event() / a.us_per_event()).ln() / k,
            b.bytes_per_worker / a.bytes_per_worker.max(1.0),
            b.ms_per_round() / a.ms_per_round()
        ));
    }
    std::fs::write(s.out.join("simulate.md"), &md)?;
    plot(&rows, &s.out.join("simulate.png"))?;
    println!("{md}\nwritten to {}", s.out.display());
    Ok(())
}

/// A fleet of `n` volunteers for `rounds` rounds.
fn fleet(n: usize, rounds: u64, seed: u64) -> Row {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ n as u64);
    let mut vols: Vec<Volunteer> = (0..n)
        .map(|i| {
            let mut key = [0u8; 32];
            rng.fill(&mut key);
            // Log-normal speeds around 0.5 ms per sample; 2% are stragglers 20x slower.
            let z: f64 = (0..12).map(|_| rng.gen::<f64>()).sum::<f64>() - 6.0;
            let slow = if rng.gen_bool(0.02) { 20.0 } else { 1.0 };
            Volunteer {
                key: WorkerId(key),
                ms_per_sample: 0.5 * (0.4 * z).exp() * slow,
                latency_ms: 10.0 + 40.0 * rng.gen::<f64>(),
                cheater: i % 200 == 199,
                conn: None,
            }
        })
        .collect();
    let mut queue: BinaryHeap<Reverse<(Duration, u64, usize)>> =
        BinaryHeap::with_capacity(8 * n + 64);
    let mut evs: HashMap<u64, Ev> = HashMap::with_capacity(8 * n + 64);
    let mut seq = 0u64;
    let mut push = |queue: &mut BinaryHeap<Reverse<(Duration, u64, usize)>>,
                    evs: &mut HashMap<u64, Ev>,
                    at: Duration,
                    ev: Ev| {
        seq += 1;
        queue.push(Reverse((at, seq, 0)));
        evs.insert(seq, ev);
    };
    for i in 0..n {
        let at = Duration::from_millis(rng.gen_range(0..1000));
        push(&mut queue, &mut evs, at, Ev::Join(i));
    }
    let t0 = Instant::now();
    let base = live();
    let mut core: Core<u64, Seq> = Core::new(
        Config {
            min_workers: n.div_ceil(2),
            start_gather: Duration::ZERO,
            balance_by_speed: true,
            first_task_timeout: Duration::from_secs(60),
            min_task_timeout: Duration::from_secs(5),
            straggler_grace: Duration::from_secs(1),
            max_strikes: 3,
            max_pending_checks: usize::MAX,
            checks: Some((SpotCheckPolicy::default(), [7; 32])),
            run_seed: seed,
            inner_batches: 1,
            total_batches: u64::MAX / 2,
            growth: Some(Growth {
                min_micro_batch: MIN_MICRO,
                max_global_batch: n * MIN_MICRO,
            }),
            next_hints: false,
        },
        Seq,
        Vec::new(),
        0,
    );
    let mut now = Duration::ZERO;
    let mut next_conn = 0u64;
    let mut conn_vol: HashMap<u64, usize> = HashMap::with_capacity(2 * n);
    let (mut core_time, mut events) = (Duration::ZERO, 0u64);
    let (mut done, mut tasks, mut reassigned, mut timeouts) = (0u64, 0u64, 0u64, 0u64);
    let mut banned: HashSet<WorkerId> = HashSet::new();
    let mut peak = 0isize;
    let mut round_started = Duration::ZERO;
    let mut round_ms = Vec::new();
    let mut next_round = 0u64;
    let timed = |core_time: &mut Duration, f: &mut dyn FnMut()| {
        let s = Instant::now();
        f();
        *core_time += s.elapsed();
    };
    timed(&mut core_time, &mut || core.open_round(t0 + now, 0, 0));
    next_round += 1;
    while done < rounds {
        // Carry out the core's actions (simulated: they schedule the fleet's reactions).
        loop {
            let s = Instant::now();
            let a = core.poll_action();
            core_time += s.elapsed();
            let Some(a) = a else { break };
            match a {
                Action::SendTask {
                    conn,
                    task,
                    reassigned: r,
                    ..
                } => {
                    tasks += 1;
                    reassigned += u64::from(r);
                    let Some(&i) = conn_vol.get(&conn) else {
                        continue;
                    };
                    let v = &vols[i];
                    let compute = v.ms_per_sample * task.slice.indices.len() as f64 + 5.0;
                    let trip = 2.0 * v.latency_ms + compute;
                    let roll: f64 = rng.gen();
                    if roll < 0.002 {
                        // Leaves mid-task, back 5 s later on a new connection.
                        push(&mut queue, &mut evs, now + ms(trip / 2.0), Ev::Leave(conn));
                        push(
                            &mut queue,
                            &mut evs,
                            now + ms(trip / 2.0 + 5000.0),
                            Ev::Join(i),
                        );
                    } else if roll < 0.003 {
                        // Falls silent: the core closes it after its deadline.
                    } else {
                        push(
                            &mut queue,
                            &mut evs,
                            now + ms(trip),
                            Ev::Answer {
                                conn,
                                task: task.task_id,
                                cheat: v.cheater,
                            },
                        );
                    }
                }
                Action::Close {
                    conn, worker, why, ..
                } => {
                    if why == rounds::CloseWhy::Timeout {
                        timeouts += 1;
                    }
                    if let Some(i) = conn_vol.remove(&conn) {
                        vols[i].conn = None;
                        if !banned.contains(&worker) && why != rounds::CloseWhy::Protocol {
                            push(&mut queue, &mut evs, now + ms(5000.0), Ev::Join(i));
                        }
                    }
                }
                Action::Accepted {
                    worker,
                    result,
                    check: true,
                    ..
                } => {
                    let caught = result == 1;
                    push(
                        &mut queue,
                        &mut evs,
                        now + ms(50.0),
                        Ev::CheckDone { worker, caught },
                    );
                }
                Action::Banned { worker, .. } => {
                    banned.insert(worker);
                }
                Action::Commit(c) => {
                    done += 1;
                    round_ms.push((now - round_started).as_secs_f64() * 1000.0);
                    let _ = c;
                    peak = peak.max(live() - base);
                }
                _ => {}
            }
        }
        if core.phase() == Phase::Idle && done < rounds {
            round_started = now;
            let first = next_round * 1_000_000;
            timed(&mut core_time, &mut || {
                core.open_round(t0 + now, next_round, first)
            });
            next_round += 1;
            continue;
        }
        if core.phase() == Phase::InFlight {
            peak = peak.max(live() - base);
        }
        // The next event, or the core's timer, whichever comes first.
        let timer = core.poll_timeout().map(|t| t.saturating_duration_since(t0));
        let next = queue.peek().map(|Reverse((t, _, _))| *t);
        match (next, timer) {
            (Some(e), Some(t)) if t < e => {
                now = now.max(t);
                events += 1;
                timed(&mut core_time, &mut || core.handle_timeout(t0 + now));
            }
            (None, Some(t)) => {
                now = now.max(t);
                events += 1;
                timed(&mut core_time, &mut || core.handle_timeout(t0 + now));
            }
            (Some(_), _) => {
                let Some(Reverse((t, id, _))) = queue.pop() else {
                    break;
                };
                now = now.max(t);
                let Some(ev) = evs.remove(&id) else { continue };
                events += 1;
                let at = t0 + now;
                match ev {
                    Ev::Join(i) => {
                        if vols[i].conn.is_some() || banned.contains(&vols[i].key) {
                            continue;
                        }
                        next_conn += 1;
                        let conn = next_conn;
                        vols[i].conn = Some(conn);
                        conn_vol.insert(conn, i);
                        let worker = vols[i].key;
                        timed(&mut core_time, &mut || {
                            core.handle(at, Input::Joined { conn, worker })
                        });
                    }
                    Ev::Leave(conn) => {
                        if let Some(i) = conn_vol.remove(&conn) {
                            vols[i].conn = None;
                        }
                        timed(&mut core_time, &mut || {
                            core.handle(
                                at,
                                Input::Left {
                                    conn,
                                    reason: "left".into(),
                                    offence: false,
                                },
                            )
                        });
                    }
                    Ev::Answer { conn, task, cheat } => {
                        timed(&mut core_time, &mut || {
                            core.handle_result(at, conn, task, |_| {
                                Ok(Valid {
                                    result: u64::from(cheat),
                                    compute_ms: 1.0,
                                })
                            })
                        });
                    }
                    Ev::CheckDone { worker, caught } => {
                        let input = if caught {
                            Input::Caught {
                                worker,
                                reason: "simulated cheat".into(),
                            }
                        } else {
                            Input::CheckPassed { worker }
                        };
                        timed(&mut core_time, &mut || core.handle(at, input.clone()));
                    }
                }
            }
            (None, None) => break,
        }
    }
    round_ms.sort_by(f64::total_cmp);
    Row {
        n,
        rounds: done,
        events,
        core_s: core_time.as_secs_f64(),
        bytes_per_worker: peak.max(0) as f64 / n as f64,
        virtual_round_ms: round_ms.get(round_ms.len() / 2).copied().unwrap_or(0.0),
        tasks,
        reassigned,
        timeouts,
        banned: banned.len(),
    }
}

fn ms(x: f64) -> Duration {
    Duration::from_secs_f64(x.max(0.0) / 1000.0)
}

/// A plot panel: its title and the figure it shows.
type Panel = (&'static str, fn(&Row) -> f64);

fn plot(rows: &[Row], path: &std::path::Path) -> Result<()> {
    let root = BitMapBackend::new(path, (1100, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(550);
    let xs = || rows.iter().map(|r| r.n as f64);
    let xmin = xs().fold(f64::MAX, f64::min) / 1.5;
    let xmax = xs().fold(1.0, f64::max) * 1.5;
    let panels: [Panel; 2] = [
        ("core time per event (µs)", |r| r.us_per_event()),
        ("core memory per worker (bytes)", |r| r.bytes_per_worker),
    ];
    for (area, (what, f)) in [left, right].iter().zip(panels) {
        let ys: Vec<f64> = rows.iter().map(&f).collect();
        let ymax = ys.iter().copied().fold(1e-9, f64::max) * 1.3;
        let mut chart = ChartBuilder::on(area)
            .caption(format!("{what} vs workers"), ("sans-serif", 20))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d((xmin..xmax).log_scale(), 0.0..ymax)?;
        chart
            .configure_mesh()
            .x_desc("workers (log)")
            .y_desc(what)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .draw()?;
        let pts: Vec<(f64, f64)> = rows.iter().map(|r| (r.n as f64, f(r))).collect();
        chart.draw_series(LineSeries::new(pts.clone(), BLUE.stroke_width(2)))?;
        chart.draw_series(pts.iter().map(|p| Circle::new(*p, 4, BLUE.filled())))?;
    }
    root.present()?;
    Ok(())
}
