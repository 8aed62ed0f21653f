//! The status server: what it shows of a running swarm, its Prometheus metrics, operator
//! actions only with the identity's token, bad requests refused, `coordinator status` and
//! `coordinator ctl`, and a taken port as a clear error at start.

use std::process::Command;
use std::time::Duration;

use integration_tests::{bin, swarm_config, wait_until, Coordinator, Worker};
use serde_json::Value;

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .http_status_as_error(false)
        .build()
        .into()
}

/// GET `path`: (status code, body).
fn get(base: &str, path: &str) -> (u16, String) {
    let r = agent().get(format!("{base}{path}")).call().unwrap();
    let code = r.status().as_u16();
    (code, r.into_body().read_to_string().unwrap())
}

fn get_json(base: &str, path: &str) -> Value {
    let (code, body) = get(base, path);
    assert_eq!(code, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap()
}

/// POST `body` to `path` with an optional bearer token: the status code.
fn post(base: &str, path: &str, token: Option<&str>, body: &str) -> u16 {
    let mut req = agent()
        .post(format!("{base}{path}"))
        .header("Content-Type", "application/json");
    if let Some(t) = token {
        req = req.header("Authorization", &format!("Bearer {t}"));
    }
    req.send(body).unwrap().status().as_u16()
}

fn identity(c: &Coordinator) -> Value {
    serde_json::from_slice(&std::fs::read(c.out().join("identity.json")).unwrap()).unwrap()
}

/// `coordinator CMD --config CONFIG REST...`.
fn coordinator_cli(cmd: &str, config: &std::path::Path, rest: &[&str]) -> std::process::Output {
    Command::new(bin("coordinator"))
        .args([cmd, "--config"])
        .arg(config)
        .args(rest)
        .output()
        .unwrap()
}

/// The status server's URL, as the coordinator records it in its output dir.
fn recorded_url(c: &Coordinator) -> String {
    let path = c.out().join("monitor.url");
    wait_until(Duration::from_secs(60), || {
        std::fs::read_to_string(&path).ok()
    })
    .unwrap_or_else(|| panic!("no monitor.url: {}", c.log()))
    .trim()
    .trim_end_matches('/')
    .to_string()
}

/// A 2000-round MLP run with the status server on port 0 (the port the system picks;
/// evaluating every `eval_every` rounds; 0: only at epoch ends) and two workers, `alpha` and
/// `beta`: the coordinator, the server's base URL, and the workers (killed on drop).
fn monitored_swarm(eval_every: u64) -> (Coordinator, String, [Worker; 2]) {
    let cfg = swarm_config(
        "mlp",
        2000,
        64,
        2,
        1,
        "[monitor]\nlisten = \"127.0.0.1:0\"\n",
    )
    .replacen(
        "threads = 1\n",
        &format!("threads = 1\neval_every = {eval_every}\n"),
        1,
    );
    let c = Coordinator::start(&cfg);
    let join = c.join_string();
    let workers = ["alpha", "beta"].map(|n| Worker::start(&join, c.dir.path(), n, &[]));
    let base = recorded_url(&c);
    (c, base, workers)
}

/// Sends `raw` on a new connection to `base` and returns the status line of the answer.
fn raw_request(base: &str, raw: &str) -> String {
    use std::io::{BufRead, Write};
    let addr = base.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(raw.as_bytes()).unwrap();
    let mut line = String::new();
    let _ = std::io::BufReader::new(s).read_line(&mut line);
    line
}

/// What `coordinator status` prints for `c`'s run (it must succeed).
fn status_text(c: &Coordinator) -> String {
    let out = coordinator_cli("status", c.config_path(), &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_status_server_shows_the_run_and_acts_only_with_the_token() {
    let (mut c, base, _workers) = monitored_swarm(0);
    let running = || {
        let s = get_json(&base, "/api/status");
        (s["step"].as_u64()? >= 5 && s["state"] == "running").then_some(s)
    };
    let status =
        wait_until(Duration::from_secs(90), running).unwrap_or_else(|| panic!("{}", c.log()));
    assert_eq!(status["model"], "mlp");
    assert_eq!(status["dataset"], "fashion-mnist");
    assert_eq!(status["workers"], 2);
    assert!(status["loss"].as_f64().unwrap() > 0.0);
    assert!(status["samples_per_s"].as_f64().unwrap() > 0.0);
    let workers = get_json(&base, "/api/workers");
    let rows = workers.as_array().unwrap();
    assert_eq!(rows.len(), 2, "{workers}");
    let names: Vec<&str> = rows.iter().map(|w| w["name"].as_str().unwrap()).collect();
    assert!(names.iter().any(|n| n.starts_with("alpha")), "{names:?}");
    assert!(
        rows.iter().all(|w| w["tasks"].as_u64().unwrap() > 0),
        "{workers}"
    );
    let history = get_json(&base, "/api/history");
    assert!(history["loss"]["points"].as_array().unwrap().len() >= 5);
    let (code, metrics) = get(&base, "/metrics");
    assert_eq!(code, 200);
    for want in [
        "dtrain_rounds_total ",
        "dtrain_workers 2",
        "dtrain_round_seconds_bucket",
        "dtrain_received_bytes_total ",
    ] {
        assert!(metrics.contains(want), "{want} missing:\n{metrics}");
    }
    let (code, page) = get(&base, "/");
    assert_eq!(code, 200);
    assert!(page.contains("/dashboard.js") && page.contains("loss-chart"));
    // Nothing served holds the join secret.
    let secret = identity(&c)["secret"].as_str().unwrap().to_string();
    let token = identity(&c)["monitor_token"].as_str().unwrap().to_string();
    for p in [
        "/",
        "/api/status",
        "/api/workers",
        "/api/history",
        "/metrics",
    ] {
        assert!(
            !get(&base, p).1.contains(&secret),
            "{p} shows the join secret"
        );
        assert!(!get(&base, p).1.contains(&token), "{p} shows the token");
    }

    // Actions without the token, or with a wrong one, change nothing.
    assert_eq!(post(&base, "/api/pause", None, ""), 401);
    assert_eq!(post(&base, "/api/stop", Some(&"0".repeat(64)), ""), 401);
    assert_eq!(post(&base, "/api/ban", Some("nonsense"), "{}"), 401);
    // Malformed and oversized requests are refused.
    assert_eq!(post(&base, "/api/ban", Some(&token), "{not json"), 400);
    assert_eq!(
        post(&base, "/api/ban", Some(&token), "{\"worker\": \"zz\"}"),
        400
    );
    assert_eq!(
        post(&base, "/api/ban", Some(&token), &"x".repeat(10_000)),
        413
    );
    // A huge declared body is refused from its header, without waiting for it.
    let line = raw_request(
        &base,
        "POST /api/ban HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n\r\n",
    );
    assert!(line.contains(" 413 "), "{line}");
    // Half-sent requests: one address holds at most 16 connections, the others are closed at
    // once; those held are closed when their headers are 10 s late, so the server answers
    // again while the client still holds all its sockets. The run goes on meanwhile.
    let mut idle: Vec<std::net::TcpStream> = (0..200)
        .filter_map(|_| {
            let mut s = std::net::TcpStream::connect(base.trim_start_matches("http://")).ok()?;
            std::io::Write::write_all(&mut s, b"GET / HTTP/1.1\r\n").ok()?;
            s.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
            Some(s)
        })
        .collect();
    assert_eq!(idle.len(), 200);
    let closed = idle
        .iter_mut()
        .map(|s| std::io::Read::read(s, &mut [0u8; 64]))
        // Closed with our request unread: a reset rather than an end of stream.
        .filter(|r| match r {
            Ok(n) => *n == 0,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        })
        .count();
    assert!(closed >= 184, "{closed} of 200 closed at once");
    let during = c.steps_done();
    let answers = || {
        agent()
            .get(format!("{base}/api/status"))
            .call()
            .ok()
            .filter(|r| r.status() == 200)
    };
    assert!(
        wait_until(Duration::from_secs(25), answers).is_some(),
        "answers once the held ones time out"
    );
    assert!(c.steps_done() > during, "training went on");
    drop(idle);
    assert_eq!(get(&base, "/api/nothing").0, 404);
    // The scheme is case-insensitive (RFC 7235); resume while running changes nothing.
    let lower = agent()
        .post(format!("{base}/api/resume"))
        .header("Authorization", &format!("bearer {token}"))
        .send_empty()
        .unwrap();
    assert_eq!(lower.status(), 202);
    let before = c.steps_done();
    std::thread::sleep(Duration::from_secs(1));
    assert!(c.steps_done() > before, "still training");
    assert!(c.events("paused").is_empty() && c.events("banned").is_empty());

    // Pause: the round in flight ends, no other starts.
    assert_eq!(post(&base, "/api/pause", Some(&token), ""), 202);
    let paused = || (get_json(&base, "/api/status")["state"] == "paused").then_some(());
    assert!(
        wait_until(Duration::from_secs(20), paused).is_some(),
        "{}",
        c.log()
    );
    std::thread::sleep(Duration::from_millis(500));
    let at = c.steps_done();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(c.steps_done(), at, "no round while paused");
    let text = status_text(&c);
    assert!(
        text.contains("state Paused") && text.contains("live from") && text.contains("alpha"),
        "{text}"
    );
    let out = coordinator_cli("ctl", c.config_path(), &["resume"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        wait_until(Duration::from_secs(20), || (c.steps_done() > at + 2)
            .then_some(()))
        .is_some(),
        "resumed"
    );

    // Ban beta by its key: disconnected, counted, refused.
    let beta = rows
        .iter()
        .find(|w| w["name"].as_str().unwrap().starts_with("beta"))
        .unwrap()["worker"]
        .as_str()
        .unwrap()
        .to_string();
    let out = coordinator_cli(
        "ctl",
        c.config_path(),
        &["ban", &beta, "--reason", "test ban"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let banned = || {
        let s = get_json(&base, "/api/status");
        (s["banned"] == 1 && s["workers"] == 1).then_some(s)
    };
    let s = wait_until(Duration::from_secs(20), banned).unwrap_or_else(|| panic!("{}", c.log()));
    assert!(
        s["bans"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("banned by the operator: test ban"),
        "{s}"
    );
    assert_eq!(c.events("banned")[0]["worker"], beta.as_str());

    // Paused, stopped with a checkpoint, and started again: still paused.
    assert_eq!(post(&base, "/api/pause", Some(&token), ""), 202);
    assert!(
        wait_until(Duration::from_secs(20), paused).is_some(),
        "{}",
        c.log()
    );
    assert_eq!(post(&base, "/api/stop", Some(&token), ""), 202);
    assert!(c.wait(Duration::from_secs(60)).success(), "{}", c.log());
    let stopped_at = c.steps_done();
    assert!(
        !c.out().join("monitor.url").exists(),
        "monitor.url goes with the coordinator"
    );
    c.spawn();
    let base = recorded_url(&c);
    let paused_again = || (get_json(&base, "/api/status")["state"] == "paused").then_some(());
    assert!(
        wait_until(Duration::from_secs(30), paused_again).is_some(),
        "{}",
        c.log()
    );
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        c.steps_done(),
        stopped_at,
        "a paused run stays paused across a restart"
    );

    // Stop with a checkpoint; the summary then comes from the output dir.
    assert_eq!(post(&base, "/api/stop", Some(&token), ""), 202);
    assert!(c.wait(Duration::from_secs(60)).success(), "{}", c.log());
    assert_eq!(c.events("stopped").len(), 2);
    let text = status_text(&c);
    assert!(
        text.contains("state Stopped") && text.contains("metrics.jsonl"),
        "{text}"
    );
    assert!(text.contains("ban at step"), "{text}");
    // The run's id and its counters over both sessions.
    let run_id = identity(&c)["run_id"].as_str().unwrap().to_string();
    assert!(
        text.starts_with(&format!("run {}", &run_id[..16])),
        "{text}"
    );
    let passed = c.events("check_passed").len();
    assert!(passed > 0);
    assert!(
        text.contains(&format!("spot checks {passed} passed of")),
        "{passed} checks passed:\n{text}"
    );
}

#[test]
fn a_taken_status_port_is_a_clear_error_at_start() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let cfg = swarm_config(
        "mlp",
        5,
        64,
        1,
        1,
        &format!("[monitor]\nlisten = \"127.0.0.1:{port}\"\n"),
    );
    let mut c = Coordinator::start(&cfg);
    let status = c.wait(Duration::from_secs(60));
    assert!(!status.success());
    let log = c.log();
    assert!(
        log.contains(&format!(
            "monitor.listen 127.0.0.1:{port}: cannot listen there"
        )),
        "{log}"
    );
    // Nothing of the run was written.
    assert!(!c.out().join("join.txt").exists());
}

/// Debian's headless Chromium (installed by `make test`'s set-up).
fn chromium() -> std::path::PathBuf {
    let found = ["chromium", "chromium-browser"].iter().find_map(|n| {
        let out = Command::new("sh")
            .args(["-c", &format!("command -v {n}")])
            .output()
            .ok()?;
        let p = String::from_utf8_lossy(&out.stdout).trim().to_string();
        (!p.is_empty()).then(|| p.into())
    });
    found.expect("the dashboard test needs Debian's chromium package (make test installs it)")
}

#[test]
fn headless_chromium_draws_the_dashboard_of_a_running_swarm() {
    let (c, base, _workers) = monitored_swarm(5);
    let evaluated = || {
        (!get_json(&base, "/api/history")["eval_accuracy"]["points"]
            .as_array()?
            .is_empty())
        .then_some(())
    };
    assert!(
        wait_until(Duration::from_secs(90), evaluated).is_some(),
        "{}",
        c.log()
    );
    let profile = tempfile::tempdir().unwrap();
    let out = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        // Runs the page's timers and fetches for up to 10 s of page time, then prints the DOM.
        .args([
            "--virtual-time-budget=10000",
            "--dump-dom",
            &format!("{base}/"),
        ])
        .output()
        .unwrap();
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let attr = |id: &str| -> usize {
        let at = dom
            .find(&format!("id=\"{id}\""))
            .unwrap_or_else(|| panic!("no #{id}:\n{dom}"));
        let tag = &dom[dom[..at].rfind('<').unwrap()..at + dom[at..].find('>').unwrap()];
        let v = tag
            .split("data-points=\"")
            .nth(1)
            .unwrap_or_else(|| panic!("{tag}"));
        v[..v.find('"').unwrap()].parse().unwrap()
    };
    assert!(
        attr("loss-chart") >= 5,
        "the loss chart has its points:\n{dom}"
    );
    assert!(
        attr("eval-chart") >= 1,
        "the evaluation chart has its points:\n{dom}"
    );
    // The workers table has both workers, by name, and the state is shown.
    let table = &dom[dom.find("id=\"workers\"").unwrap()..];
    let table = &table[..table.find("</table>").unwrap()];
    assert_eq!(table.matches("data-worker=").count(), 2, "{table}");
    assert!(table.contains("alpha") && table.contains("beta"), "{table}");
    assert!(dom.contains("class=\"state running\""), "{dom}");
    assert!(dom.contains("fashion-mnist"), "{dom}");
}
