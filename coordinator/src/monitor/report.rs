//! `coordinator status`: the run's summary as terminal text, from the status server or,
//! when the run is not running, from its output dir; and `coordinator ctl`, the operator
//! actions from the terminal.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::status::{Digest, Status, WorkerRow};
use crate::state::local_addr;
use trainer::runtime::human_bytes;

/// How long a request to the status server may take.
const TIMEOUT: Duration = Duration::from_secs(5);

/// The file in the output dir where a running coordinator records its status server's URL.
pub const URL_FILE: &str = "monitor.url";

/// [`URL_FILE`] while the coordinator runs: written at start, removed when dropped.
pub struct UrlFile(std::path::PathBuf);

impl UrlFile {
    /// Records that the status server of the run in `dir` listens on `addr`.
    ///
    /// # Errors
    /// The file cannot be written.
    pub fn record(dir: &Path, addr: SocketAddr) -> Result<Self> {
        let path = dir.join(URL_FILE);
        crate::state::atomic_write(&path, format!("http://{addr}/\n").as_bytes())?;
        Ok(UrlFile(path))
    }
}

impl Drop for UrlFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The run id in `dir/identity.json` (hex), if there is one.
fn run_id(dir: &Path) -> Option<String> {
    let bytes = std::fs::read(dir.join("identity.json")).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    Some(v["run_id"].as_str()?.to_string())
}

/// The live status of the run in `dir` from the server at `addr`, refused when the server
/// there serves another run (a stale address, or another program on the port).
fn fetch_own(dir: &Path, addr: SocketAddr) -> Result<(Status, Vec<WorkerRow>)> {
    let (s, w) = fetch(addr)?;
    match run_id(dir) {
        Some(id) if id != s.run_id => bail!(
            "the server at {addr} serves run {}, not this run ({})",
            s.run_id.get(..16).unwrap_or(&s.run_id),
            id.get(..16).unwrap_or(&id)
        ),
        _ => Ok((s, w)),
    }
}

/// The address of the status server of the run in `dir` configured with `listen`: the one
/// recorded in [`URL_FILE`] when the configured port is 0, reachable from this machine.
fn server(dir: &Path, listen: SocketAddr) -> SocketAddr {
    let recorded = || -> Option<SocketAddr> {
        let text = std::fs::read_to_string(dir.join(URL_FILE)).ok()?;
        text.trim()
            .strip_prefix("http://")?
            .trim_end_matches('/')
            .parse()
            .ok()
    };
    match listen.port() {
        0 => local_addr(recorded().unwrap_or(listen)),
        _ => local_addr(listen),
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(TIMEOUT))
        .http_status_as_error(false)
        .build()
        .into()
}

/// The live status and workers from the status server at `addr`.
fn fetch(addr: SocketAddr) -> Result<(Status, Vec<WorkerRow>)> {
    let base = format!("http://{addr}");
    let a = agent();
    let get = |path: &str| -> Result<ureq::Body> {
        let r = a.get(format!("{base}{path}")).call()?;
        if r.status() != 200 {
            bail!("{base}{path} answered {}", r.status());
        }
        Ok(r.into_body())
    };
    let status = get("/api/status")?.read_json()?;
    let workers = get("/api/workers")?.read_json()?;
    Ok((status, workers))
}

/// The summary of the run whose config names `output_dir` and `listen`: live when its
/// status server answers, else from `metrics.jsonl` (with a line saying why).
pub fn status_text(output_dir: &Path, listen: Option<SocketAddr>) -> Result<String> {
    let why = match listen.map(|l| server(output_dir, l)) {
        Some(a) => match fetch_own(output_dir, a) {
            Ok((s, w)) => return Ok(format(&s, Some(&w), &format!("live from http://{a}"))),
            Err(e) => format!("the status server at {a} did not answer ({e})"),
        },
        None => "no [monitor] listen in the config".to_string(),
    };
    let path = output_dir.join("metrics.jsonl");
    if !path.exists() {
        bail!(
            "{} does not exist: the run has not started ({why})",
            path.display()
        );
    }
    let mut d = Digest::read(&path).with_context(|| format!("reading {}", path.display()))?;
    // The run id is not in the events; the identity has it.
    d.status.run_id = run_id(output_dir).unwrap_or_default();
    Ok(format(
        &d.status,
        None,
        &format!("from {} ({why})", path.display()),
    ))
}

/// Formats a summary; `workers` when known (live).
pub fn format(s: &Status, workers: Option<&[WorkerRow]>, source: &str) -> String {
    let mut t = String::new();
    let opt = |x: Option<f64>, d: usize| x.map_or("-".to_string(), |v| format!("{v:.d$}"));
    let _ = writeln!(t, "run {} ({source})", short(&s.run_id));
    let _ = writeln!(
        t,
        "  state {:?}, step {}/{}, epoch {:.2}, wall {:.0} s",
        s.state, s.step, s.total_steps, s.epoch, s.wall_s
    );
    let eval = s.eval.map_or("-".to_string(), |e| {
        if s.language_model {
            format!("val loss {} (step {})", opt(e.loss, 4), e.step)
        } else {
            format!("test acc {} (step {})", opt(e.accuracy, 4), e.step)
        }
    });
    let _ = writeln!(t, "  loss {}, {eval}", opt(s.loss, 4));
    let rate = if s.language_model {
        format!("{} tokens/s", opt(s.tokens_per_s, 0))
    } else {
        format!("{} samples/s", opt(s.samples_per_s, 1))
    };
    let _ = writeln!(
        t,
        "  {rate}, up {}, down {}, data served {}, uplink x{:.1}",
        human_bytes(s.bytes_in),
        human_bytes(s.bytes_out),
        human_bytes(s.data_served),
        s.uplink_ratio
    );
    let _ = writeln!(
        t,
        "  workers {} (seen {}), spot checks {} passed of {}, cheats {}, banned {}, rollbacks {} ({} removed)",
        s.workers, s.workers_seen, s.checks.passed, s.checks.done, s.checks.caught, s.banned,
        s.rollbacks, s.removed
    );
    for c in &s.cheats {
        let _ = writeln!(
            t,
            "  cheat at step {}: {} task {}: {}",
            c.step,
            short(&c.worker),
            c.task_id,
            clean(&c.reason)
        );
    }
    for b in &s.bans {
        let _ = writeln!(
            t,
            "  ban at step {}: {}: {}",
            b.step,
            short(&b.worker),
            clean(&b.reason)
        );
    }
    if let Some(ws) = workers {
        let _ = writeln!(
            t,
            "  {:<20} {:>9} {:>6} {:>6} {:>7} {:>7} {:>10} {:>10}  key",
            "name", "samples/s", "share", "tasks", "checks", "strikes", "up", "down"
        );
        for w in ws {
            let _ = writeln!(
                t,
                "  {:<20} {:>9} {:>5.1}% {:>6} {:>7} {:>7} {:>10} {:>10}  {}",
                clean(&w.name).chars().take(20).collect::<String>(),
                opt(w.samples_per_s, 1),
                100.0 * w.share,
                w.tasks,
                w.checks_passed,
                w.strikes,
                human_bytes(w.bytes_in),
                human_bytes(w.bytes_out),
                clean(&w.worker),
            );
        }
    }
    t
}

fn short(key: &str) -> String {
    clean(key.get(..16).unwrap_or(key))
}

/// Text from workers without control characters (no escape sequences reach the terminal).
fn clean(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).collect()
}

/// An operator action for `coordinator ctl`: `pause`, `resume`, `stop`, or `ban` with a key.
pub fn act(
    output_dir: &Path,
    listen: SocketAddr,
    action: &str,
    ban: Option<(&str, &str)>,
) -> Result<String> {
    let Some(token) = crate::state::read_monitor_token(output_dir)? else {
        bail!(
            "{} has no monitor_token: start the run once with this version of the coordinator",
            output_dir.join("identity.json").display()
        );
    };
    let addr = server(output_dir, listen);
    // The token goes only to the server of this run.
    fetch_own(output_dir, addr)
        .with_context(|| format!("no status server of this run at {addr}; is the run running?"))?;
    let url = format!("http://{addr}/api/{action}");
    let req = agent()
        .post(&url)
        .header("Authorization", &format!("Bearer {token}"));
    let r = match ban {
        Some((worker, reason)) => {
            req.send_json(serde_json::json!({ "worker": worker, "reason": reason }))
        }
        None => req.send_empty(),
    }
    .with_context(|| format!("cannot reach {url}"))?;
    let code = r.status();
    let body = r.into_body().read_to_string().unwrap_or_default();
    if code.is_success() {
        Ok(format!("{action}: accepted"))
    } else {
        bail!("{url} answered {code}: {body}")
    }
}
