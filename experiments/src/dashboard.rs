//! `experiments dashboard`: screenshots of the status server's dashboard over a running
//! swarm, taken by headless Chromium (Debian's `chromium`).
//!
//! Four workers train the MLP on Fashion-MNIST with spot checks; one of them adds noise to
//! its updates (test-only adversary), so the page shows checks, a cheat with its evidence,
//! a ban and a rollback. Once the run has its ban and `after_steps` rounds, a side process
//! takes a desktop and a phone-sized screenshot, then stops the run with
//! `coordinator ctl stop` (the operator path, with the token of the run's identity).

use std::path::PathBuf;

use anyhow::{bail, Result};

use crate::swarm;

/// Settings of the screenshots.
pub struct Settings {
    /// Rounds before the screenshots (the run is longer; it is stopped after them).
    pub after_steps: u64,
    /// Output folder: `dashboard.png`, `dashboard-phone.png`.
    pub out: PathBuf,
}

/// Runs the swarm and takes the screenshots.
pub fn run(s: &Settings) -> Result<()> {
    std::fs::create_dir_all(&s.out)?;
    let out = std::path::absolute(&s.out)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let cfg = format!(
        "{}[verification]\np = 0.2\nnew_worker_p = 1.0\ntrusted_after = 20\n\n\
         [monitor]\nlisten = \"127.0.0.1:{port}\"\n",
        swarm::base_config("mlp", 100 * s.after_steps.max(1), 256, 1, 4, 1).replacen(
            "threads = 1\n",
            "threads = 1\neval_every = 10\n",
            1
        ),
    );
    let dir = out.join("runs/latest");
    let metrics = dir.join("out/metrics.jsonl");
    let shot = |file: &str, size: &str| {
        format!(
            "chromium --headless --no-sandbox --disable-gpu --disable-dev-shm-usage \
             --no-first-run --hide-scrollbars --user-data-dir={d}/chromium \
             --window-size={size} --virtual-time-budget=6000 \
             --screenshot={o}/{file} http://127.0.0.1:{port}/",
            d = dir.display(),
            o = out.display(),
        )
    };
    let script = format!(
        "until grep -q '\"event\":\"banned\"' {m} && \
         [ \"$(grep -c '\"event\":\"step\"' {m})\" -ge {n} ]; do sleep 1; done; \
         {desktop}; {phone}; \
         exec {coord} ctl --config {d}/run.toml stop",
        m = metrics.display(),
        n = s.after_steps,
        desktop = shot("dashboard.png", "1280,1130"),
        phone = shot("dashboard-phone.png", "412,1900"),
        coord = swarm::sibling("coordinator")?.display(),
        d = dir.display(),
    );
    let workers = vec![
        vec![],
        vec![],
        vec![],
        vec!["--test-adversary".to_string(), "noise".to_string()],
    ];
    let sidecar = vec!["bash".to_string(), "-c".to_string(), script];
    swarm::run(&dir, &cfg, &workers, &[sidecar])?;
    for f in ["dashboard.png", "dashboard-phone.png"] {
        if !out.join(f).exists() {
            bail!(
                "no {f}: is Debian's chromium installed? see {}",
                dir.join("sidecar0.log").display()
            );
        }
    }
    println!(
        "{}/dashboard.png, {}/dashboard-phone.png",
        out.display(),
        out.display()
    );
    Ok(())
}
