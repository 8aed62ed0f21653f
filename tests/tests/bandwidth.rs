//! Real links: a worker in its own network namespace, joined to the coordinator by a veth pair
//! shaped with `tc ... tbf` to 10 and 50 Mbit/s in each direction. The run completes, and the
//! time per round matches its bytes over the bandwidth (plus the compute time). Skipped, with a
//! message, where network namespaces cannot be made (not root, no iproute2).

use std::process::Command;
use std::time::Duration;

use integration_tests::{quick_config, worker_command, Coordinator};

/// A namespace with a veth pair to the root namespace, removed on drop.
struct Link {
    ns: String,
    host_if: String,
}

/// Runs `program args…` (ip or tc), with its stderr as the error.
fn sys(program: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    sys("ip", args)
}

fn tc(args: &[&str]) -> Result<(), String> {
    sys("tc", args)
}

impl Link {
    /// Namespace `dtbw-<id>` at 10.201.<id>.2, the host side at 10.201.<id>.1, both
    /// directions shaped to `mbit` Mbit/s.
    fn new(id: u8, mbit: u32) -> Result<Self, String> {
        let ns = format!("dtbw{}-{id}", std::process::id());
        let host_if = format!("dtbh{id}-{}", std::process::id() % 10000);
        let ns_if = format!("dtbw{id}-{}", std::process::id() % 10000);
        ip(&["netns", "add", &ns])?;
        let link = Link {
            ns: ns.clone(),
            host_if: host_if.clone(),
        };
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
        ])?;
        ip(&["link", "set", &ns_if, "netns", &ns])?;
        ip(&["addr", "add", &format!("10.201.{id}.1/24"), "dev", &host_if])?;
        ip(&["link", "set", &host_if, "up"])?;
        let in_ns = |args: &[&str]| {
            let mut a = vec!["netns", "exec", &ns, "ip"];
            a.extend_from_slice(args);
            ip(&a)
        };
        in_ns(&["addr", "add", &format!("10.201.{id}.2/24"), "dev", &ns_if])?;
        in_ns(&["link", "set", &ns_if, "up"])?;
        in_ns(&["link", "set", "lo", "up"])?;
        let rate = format!("{mbit}mbit");
        // Coordinator to worker: on the host end; worker to coordinator: on the namespace end.
        tc(&[
            "qdisc", "add", "dev", &host_if, "root", "tbf", "rate", &rate, "burst", "32kb",
            "latency", "2s",
        ])?;
        let shape = [
            "qdisc", "add", "dev", &ns_if, "root", "tbf", "rate", &rate, "burst", "32kb",
            "latency", "2s",
        ];
        let mut a = vec!["netns", "exec", &ns, "tc"];
        a.extend_from_slice(&shape);
        ip(&a)?;
        Ok(link)
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.host_if]);
        let _ = ip(&["netns", "del", &self.ns]);
    }
}

/// Median of the rounds after the first five (connection warm-up, first full parameters).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs 30 rounds of the MLP (fp32 uplink, 101,770 parameters) with one worker behind a
/// `mbit` link; returns (median measured round ms, median predicted round ms).
fn shaped_run(id: u8, mbit: u32) -> Option<(f64, f64)> {
    let link = match Link::new(id, mbit) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("SKIPPED: cannot make a shaped network namespace here ({e})");
            return None;
        }
    };
    let listen = format!("10.201.{id}.1:0");
    let extra = "[compression]\ncodec = \"fp32\"\nzstd_level = 0\n\n[verification]\np = 0.0\nnew_worker_p = 0.0\n";
    let mut c = Coordinator::start(&quick_config("mlp", 30, 64, &listen, extra));
    let join = c.join_string();
    // The usual worker command, run inside the namespace.
    let mut worker = worker_command(&join, &c.dir.path().join("w.key"), 20);
    worker.args(["--data-dir", "/usr/share/datasets/fashion-mnist"]);
    let mut w = Command::new("ip")
        .args(["netns", "exec", &link.ns])
        .arg(worker.get_program())
        .args(worker.get_args())
        .stderr(std::fs::File::create(c.dir.path().join("w.log")).unwrap())
        .spawn()
        .expect("worker in namespace");
    let ok = c.wait(Duration::from_secs(240)).success();
    let _ = w.kill();
    let _ = w.wait();
    assert!(ok, "{}", c.log());
    let steps = c.events("step");
    assert_eq!(steps.len(), 30, "the run completed");
    let bits_per_ms = f64::from(mbit) * 1e3;
    let mut measured = Vec::new();
    let mut predicted = Vec::new();
    for s in &steps[5..] {
        let bytes = s["round_bytes_in"].as_f64().unwrap() + s["round_bytes_out"].as_f64().unwrap();
        measured.push(s["step_ms"].as_f64().unwrap());
        // Both directions cross the link one after the other; QUIC and IP add about 4%.
        predicted.push(bytes * 8.0 * 1.04 / bits_per_ms);
    }
    Some((median(measured), median(predicted)))
}

#[test]
fn rounds_over_shaped_links_take_their_bytes_over_the_bandwidth() {
    for (id, mbit) in [(1u8, 10u32), (2, 50)] {
        let Some((measured, predicted)) = shaped_run(id, mbit) else {
            return;
        };
        eprintln!(
            "{mbit} Mbit/s: median round {measured:.0} ms, bytes / bandwidth {predicted:.0} ms"
        );
        // The rest is compute (a few ms for this model) and round trips.
        assert!(
            measured >= 0.85 * predicted && measured <= 1.25 * predicted + 60.0,
            "{mbit} Mbit/s: measured {measured:.0} ms, predicted {predicted:.0} ms"
        );
    }
}
