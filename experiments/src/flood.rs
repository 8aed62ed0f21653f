//! `experiments flood`: does a flood of connections and junk slow honest training down?
//!
//! The same CNN swarm runs twice, once alone and once beside a flooder process (this binary's
//! hidden `flooder` command) that, from the same machine, keeps opening QUIC connections that
//! send junk after the handshake and sprays junk UDP datagrams at the coordinator's port.
//! Reported: median round time of each run (after warm-up), over alternating repeats, and
//! the slowdown of the median.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use proto::JoinTicket;
use rand::RngCore;

use crate::stats::median;
use crate::swarm;

/// Settings of the experiment.
pub struct Settings {
    /// Rounds per run.
    pub rounds: u64,
    /// Connection attempts per second by the flooder.
    pub conns_per_s: u64,
    /// Junk datagrams per second by the flooder.
    pub udp_per_s: u64,
    /// Alone/flooded pairs of runs.
    pub repeats: usize,
    /// Output folder.
    pub out: PathBuf,
}

fn median_step_ms(r: &swarm::Finished) -> f64 {
    let ms: Vec<f64> = r
        .events("step")
        .iter()
        .skip(10)
        .filter_map(|e| e["step_ms"].as_f64())
        .collect();
    median(&ms)
}

/// Runs the swarm alone and flooded, `repeats` times each in turn, and writes `flood.md`
/// and `flood.json`.
pub fn run(s: &Settings) -> Result<()> {
    std::fs::create_dir_all(&s.out)?;
    let cfg = format!(
        "{}[compression]\ncodec = \"int8\"\n\n[verification]\np = 0.05\n",
        swarm::base_config("cnn", s.rounds, 64, 1, 4, 1)
    );
    let workers = vec![Vec::new(); 4];
    let me = std::env::current_exe()?.display().to_string();
    let flooder = vec![
        me,
        "flooder".into(),
        "--join".into(),
        "{join}".into(),
        "--conns-per-s".into(),
        s.conns_per_s.to_string(),
        "--udp-per-s".into(),
        s.udp_per_s.to_string(),
    ];
    let (mut alone, mut flooded, mut reports) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..s.repeats.max(1) {
        let calm = swarm::run(&s.out.join(format!("runs/calm{i}")), &cfg, &workers, &[])?;
        alone.push(median_step_ms(&calm));
        let f = swarm::run(
            &s.out.join(format!("runs/flooded{i}")),
            &cfg,
            &workers,
            std::slice::from_ref(&flooder),
        )?;
        flooded.push(median_step_ms(&f));
        let log = std::fs::read_to_string(f.dir.join("sidecar0.log")).unwrap_or_default();
        reports.push(
            log.lines()
                .rev()
                .find(|l| l.contains("attempts"))
                .unwrap_or("")
                .to_string(),
        );
        println!(
            "repeat {i}: median round alone {:.1} ms, flooded {:.1} ms",
            alone[i], flooded[i]
        );
    }
    let (a, b) = (median(&alone), median(&flooded));
    let slowdown = 100.0 * (b / a - 1.0);
    let rows: String = alone
        .iter()
        .zip(&flooded)
        .enumerate()
        .map(|(i, (x, y))| format!("| {} | {x:.1} | {y:.1} |\n", i + 1))
        .collect();
    let md = format!(
        "Written by `experiments flood`: CNN, 4 workers, {} rounds of 64, int8, spot checks at \
         p = 0.05; a flooder on the same machine opens {} QUIC connections a second (each sends \
         junk after the handshake) and sends {} junk datagrams a second to the coordinator's \
         port. The two runs alternate {} times; each cell is a run's median round time (ms).\n\n\
         | repeat | alone | flooded |\n| --- | --- | --- |\n{rows}| median | {a:.1} | {b:.1} |\n\n\
         Slowdown: **{slowdown:+.1}%** (medians). Last flooder: {}\n",
        s.rounds,
        s.conns_per_s,
        s.udp_per_s,
        s.repeats.max(1),
        reports.last().map_or("", String::as_str)
    );
    std::fs::write(s.out.join("flood.md"), &md)?;
    std::fs::write(
        s.out.join("flood.json"),
        serde_json::to_string_pretty(&serde_json::json!({
            "rounds": s.rounds, "conns_per_s": s.conns_per_s, "udp_per_s": s.udp_per_s,
            "median_round_ms_alone": alone, "median_round_ms_flooded": flooded,
            "slowdown_percent": slowdown, "flooder": reports,
        }))?,
    )?;
    println!("{md}");
    Ok(())
}

/// The flooder: runs until killed.
pub fn flooder(join: &str, conns_per_s: u64, udp_per_s: u64) -> Result<()> {
    let ticket: JoinTicket = join.parse().context("--join")?;
    let addr: SocketAddr = ticket.addr.parse().context("address")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let attempts = Arc::new(AtomicU64::new(0));
        let handshakes = Arc::new(AtomicU64::new(0));
        let datagrams = Arc::new(AtomicU64::new(0));
        let ep = proto::tls::client_endpoint(ticket.fingerprint, &Default::default(), addr)?;
        let (a, h) = (attempts.clone(), handshakes.clone());
        tokio::spawn(async move {
            let mut tick =
                tokio::time::interval(Duration::from_secs_f64(1.0 / conns_per_s.max(1) as f64));
            loop {
                tick.tick().await;
                a.fetch_add(1, Ordering::Relaxed);
                let (ep, h) = (ep.clone(), h.clone());
                tokio::spawn(async move {
                    let Ok(connecting) = ep.connect(addr, "dtrain") else {
                        return;
                    };
                    let Ok(Ok(conn)) =
                        tokio::time::timeout(Duration::from_secs(2), connecting).await
                    else {
                        return;
                    };
                    h.fetch_add(1, Ordering::Relaxed);
                    if let Ok((mut send, _recv)) = conn.open_bi().await {
                        let mut junk = vec![0u8; 512];
                        rand::thread_rng().fill_bytes(&mut junk);
                        let _ = send.write_all(&junk).await;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                });
            }
        });
        let d = datagrams.clone();
        tokio::spawn(async move {
            let Ok(sock) = tokio::net::UdpSocket::bind("0.0.0.0:0").await else {
                return;
            };
            let mut junk = vec![0u8; 1200];
            let per_tick = (udp_per_s / 100).max(1);
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            loop {
                tick.tick().await;
                for _ in 0..per_tick {
                    rand::thread_rng().fill_bytes(&mut junk);
                    let _ = sock.send_to(&junk, addr).await;
                    d.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        let start = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_secs(2)).await;
            eprintln!(
                "{:.0} s: {} connection attempts, {} TLS handshakes completed, {} junk datagrams, \
                 {:.1} CPU seconds used by the flooder",
                start.elapsed().as_secs_f64(),
                attempts.load(Ordering::Relaxed),
                handshakes.load(Ordering::Relaxed),
                datagrams.load(Ordering::Relaxed),
                coordinator::metrics::process_cpu_s()
            );
        }
    })
}
