//! The run coordinator.
//!
//! * [`config`]: the TOML run configuration.
//! * [`server`]: QUIC accept loop, handshake, limits and per-connection relays.
//! * [`scheduler`]: the driver of the round core ([`rounds`]: workers, parts, deadlines,
//!   strikes, bans as a state machine): tasks, validation, commits, evaluation.
//! * [`ledger`]: the training state, the write-ahead log, checkpoints, rollbacks.
//! * [`downlink`]: parameter payloads (full, XOR deltas, quantized deltas).
//! * [`checks`]: spot checks by re-execution, challenges, dispute bisection.
//! * [`registry`]: the driver's side of each connection, and results kept for checks.
//! * [`state`]: the run identity (atomic writes).
//! * [`metrics`]: `metrics.jsonl` and traffic counters; [`progress`]: the live line.
//! * [`monitor`]: the status server (dashboard, JSON API, Prometheus metrics, operator
//!   actions).

pub mod checks;
pub mod config;
pub mod data_server;
pub mod dataset;
pub mod downlink;
pub mod ledger;
pub mod metrics;
pub mod monitor;
pub mod prepare;
pub mod progress;
pub mod registry;
pub mod scheduler;
pub mod server;
pub mod state;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use proto::{JoinTicket, Welcome};
use tracing::{info, warn};

pub use config::RunConfig;
pub use scheduler::Outcome;

/// Waits for Ctrl-C (SIGINT) or, on Unix, SIGTERM; returns which came. Never returns when
/// neither can be listened for.
async fn stop_signal() -> &'static str {
    let ctrl_c = async {
        match tokio::signal::ctrl_c().await {
            Ok(()) => "Ctrl-C",
            Err(e) => {
                warn!("cannot listen for Ctrl-C: {e}");
                std::future::pending().await
            }
        }
    };
    #[cfg(unix)]
    let term = async {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
                "SIGTERM"
            }
            Err(e) => {
                warn!("cannot listen for SIGTERM: {e}");
                std::future::pending().await
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<&'static str>();
    tokio::select! {
        s = ctrl_c => s,
        s = term => s,
    }
}

/// Binds the run's UDP socket: on the configured address, or, for a resumed run configured
/// with port 0, on the port recorded in its identity (the one its join string names); then
/// records the port bound.
fn bind(
    cfg: &RunConfig,
    dir: &std::path::Path,
    identity: &mut state::RunIdentity,
    limits: &proto::tls::TransportLimits,
) -> Result<quinn::Endpoint> {
    let listen = state::listen_addr(cfg.run.listen, cfg.run.resume, identity.port);
    let endpoint = match proto::tls::server_endpoint(&identity.tls, listen, limits) {
        Ok(e) => e,
        Err(e) if listen != cfg.run.listen => anyhow::bail!(
            "{e}. This run resumes on port {port}, which its join string names (run.listen \
             has port 0; the port is recorded in {}): free that port, or set run.listen to \
             a fixed port and give the workers the new join string from {}",
            dir.join("identity.json").display(),
            dir.join("join.txt").display(),
            port = listen.port(),
        ),
        Err(e) => return Err(e.into()),
    };
    let port = endpoint.local_addr()?.port();
    if identity.port != Some(port) {
        identity.record_port(dir, port)?;
    }
    Ok(endpoint)
}

/// A run's inputs once checked: what [`check_inputs`] gives.
pub struct Inputs {
    /// The model (its blake3 binds the architecture).
    pub spec: trainer::ModelSpec,
    /// The training and held-out data.
    pub data: dataset::RunData,
    /// Parameters of the model.
    pub n_params: usize,
    /// The fine-tuning weights of `model.init`, in the model's flat order.
    pub init: Option<Vec<f32>>,
}

/// Checks everything a run reads before it starts, without touching the output folder:
/// the model config, the data (shard hashes, token ids, shapes), `model.init` (names,
/// shapes, finite values) and that a result sent without zstd fits
/// `network.max_frame_bytes`.
///
/// # Errors
/// The first input that is wrong, naming the file and the field.
pub fn check_inputs(cfg: &RunConfig) -> Result<Inputs> {
    let spec = cfg.check_model()?;
    let data = dataset::load(cfg, &spec)?;
    let net = trainer::Net::new(&spec, tch::Device::Cpu, cfg.run.seed);
    let n_params = net.n_params();
    let init = match &cfg.model.init {
        Some(path) => Some(
            trainer::export::read_safetensors(path, &net.layout()).with_context(|| {
                format!(
                    "{} = {}: the initial weights are refused",
                    cfg.field("model.init"),
                    path.display()
                )
            })?,
        ),
        None => None,
    };
    drop(net);
    // Results may come without zstd (it is used only where it pays): the largest a codec
    // can give, with its commitment, must fit a frame.
    let raw = compression::max_raw_len(n_params, &cfg.compression).map(|r| r as u64 + (1 << 16));
    if raw.is_none_or(|r| r > cfg.network.max_frame_bytes) {
        anyhow::bail!(
            "{} = {} is below a result of {n_params} parameters under \
             the {:?} codec sent without zstd ({} bytes); raise it",
            cfg.field("network.max_frame_bytes"),
            cfg.network.max_frame_bytes,
            cfg.compression.codec,
            raw.map_or_else(|| "too many".into(), |r| r.to_string())
        );
    }
    Ok(Inputs {
        spec,
        data,
        n_params,
        init,
    })
}

/// Runs a training run to its end (or until Ctrl-C or SIGTERM); returns how it ended.
pub async fn run(mut cfg: RunConfig) -> Result<Outcome> {
    if cfg.workers.portable {
        // Bitwise equal results need a fixed thread count as well.
        cfg.workers.deterministic_threads.get_or_insert(1);
        if !executor::class::portable_env_applied() {
            anyhow::bail!(
                "workers.portable: start the coordinator with the portable settings in its \
                 environment (`coordinator run` does so itself)"
            );
        }
    }
    // The model, its data and any initial weights are checked before the output folder is
    // touched, so a bad input changes nothing there.
    let Inputs {
        spec,
        data,
        n_params,
        init,
    } = check_inputs(&cfg)?;
    let dir = cfg.run.output_dir.clone();
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    // One coordinator per folder, for as long as this one runs (before anything is written).
    let _lock = state::DirLock::acquire(&dir)?;
    // Re-execution must use the workers' thread count to reproduce their bits.
    let threads = match cfg.workers.deterministic_threads {
        Some(t) if cfg.verification.enabled() => Some(t as usize),
        _ => cfg.training.threads,
    };
    trainer::runtime::set_threads(threads);
    let mut identity = state::RunIdentity::load_or_create(&dir)?;
    let limits = proto::tls::TransportLimits {
        idle_timeout: Duration::from_secs_f64(cfg.network.idle_timeout_s),
        keep_alive: Duration::from_secs_f64((cfg.network.idle_timeout_s / 3.0).min(5.0)),
        ..Default::default()
    };
    let served = data_server::DataServer::open(
        &data.files,
        cfg.data.serve_max_mbps,
        cfg.data.serve_max_streams,
    )?;
    #[cfg(feature = "test-hooks")]
    served.corrupt_next(cfg.test_corrupt_data);
    // The status server's port is taken before the run's, so a taken one stops the start.
    let (monitor_listener, _url_file) = match cfg.monitor.listen {
        Some(addr) => {
            let l = monitor::http::bind(addr).await?;
            // Where `coordinator status` and `ctl` find it (the port may have been 0), for as
            // long as this process runs.
            let url = monitor::report::UrlFile::record(&dir, l.local_addr()?)?;
            (Some(l), Some(url))
        }
        None => (None, None),
    };
    let endpoint = bind(&cfg, &dir, &mut identity, &limits)?;
    let bound = endpoint.local_addr()?;
    let welcome = Welcome {
        run_id: identity.run_id,
        model: spec.to_json(),
        n_params: n_params as u64,
        dataset: data.name.into(),
        dataset_digest: data.train.digest(),
        seq_len: data.seq_len,
        data_files: served.files().to_vec(),
        codec: cfg.compression.clone(),
        deterministic_threads: cfg.workers.deterministic_threads,
        portable: cfg.workers.portable,
        inner_optimizer: proto::InnerOptimizer {
            kind: cfg.inner_optimizer.kind.name().to_string(),
            lr: cfg.inner_optimizer.lr,
            beta1: cfg.inner_optimizer.beta1,
            beta2: cfg.inner_optimizer.beta2,
            eps: cfg.inner_optimizer.eps,
            weight_decay: cfg.inner_optimizer.weight_decay,
            momentum: cfg.inner_optimizer.momentum,
            nesterov: cfg.inner_optimizer.nesterov,
        },
    };
    let addr = match &cfg.run.public_addr {
        Some(a) => a.clone(),
        None if bound.ip().is_unspecified() => {
            warn!("listening on {bound}; set run.public_addr so remote workers get a reachable address");
            state::local_addr(bound).to_string()
        }
        None => bound.to_string(),
    };
    let ticket = JoinTicket {
        addr,
        fingerprint: identity.tls.fingerprint(),
        secret: identity.secret,
    };
    state::atomic_write(&dir.join("join.txt"), format!("{ticket}\n").as_bytes())?;
    println!("worker --join {ticket}");
    info!(listen = %bound, output = %dir.display(), "coordinator ready");

    let (tx, rx) = std::sync::mpsc::channel();
    let traffic = Arc::new(metrics::Traffic::default());
    let banned = Arc::new(std::sync::RwLock::new(std::collections::HashSet::new()));
    // A result frame holds at most the fp32 update plus its commitment.
    let needed = 4 * n_params as u64 + (1 << 20);
    let limits = server::ConnLimits {
        max_frame: cfg.network.max_frame_bytes.min(needed + needed / 64),
        handshake_timeout: Duration::from_secs_f64(cfg.network.handshake_timeout_s),
        max_workers: cfg.network.max_workers,
        max_handshakes: cfg.network.max_handshakes,
        frames_per_s: cfg.network.max_frames_per_s,
        bytes_per_s: cfg.network.max_bytes_per_s,
        new_conns_per_s: cfg.network.max_new_conns_per_s,
    };
    let ctx = Arc::new(server::ServerCtx::new(
        identity.secret,
        welcome,
        tx.clone(),
        limits,
        traffic.clone(),
        banned.clone(),
        Arc::new(served),
    ));
    let accept = tokio::spawn(server::accept_loop(endpoint.clone(), ctx));
    let monitor = monitor_listener.map(|listener| {
        let commands = tx.clone();
        let m = monitor::Monitor::new(
            &identity.monitor_token,
            Box::new(move |c| commands.send(server::Event::Operator(c)).is_ok()),
        );
        monitor::http::spawn(listener, m.clone());
        m
    });
    let stop_tx = tx.clone();
    tokio::spawn(async move {
        let signal = stop_signal().await;
        info!("{signal}: saving a checkpoint and stopping");
        let _ = stop_tx.send(server::Event::Stop);
    });
    let inputs = scheduler::Inputs {
        events: rx,
        events_tx: tx,
        train: Arc::new(data.train),
        test: data.test,
        spec,
        init,
        tokenizer: data.tokenizer,
        traffic,
        banned,
        check_key: blake3::derive_key("dtrain spot-check key v1", &identity.secret),
        layout: data.layout,
        monitor,
        dataset: data.name,
    };
    let sched = scheduler::Scheduler::new(cfg, identity.run_id, inputs)?;
    let outcome = tokio::task::spawn_blocking(move || sched.run()).await??;
    // Let the shutdown messages reach the workers before the endpoint goes away.
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    // A connection whose writer did not get to send the scheduler's close (a worker whose
    // message raced the stop) hears it here: after a stop it must come back, not give up.
    let (code, reason): (u32, &[u8]) = match outcome {
        scheduler::Outcome::Finished => (proto::close::DONE, b"run over"),
        scheduler::Outcome::Stopped => (
            proto::close::GOING_AWAY,
            b"coordinator stopping; the run will resume",
        ),
    };
    endpoint.close(code.into(), reason);
    accept.abort();
    Ok(outcome)
}
