//! The run coordinator.
//!
//! * [`config`]: the TOML run configuration.
//! * [`server`]: QUIC accept loop, handshake and per-connection relays.
//! * [`scheduler`]: synchronous data parallelism with churn, the optimizer, evaluation.
//! * [`state`]: identity and checkpoint files (atomic writes).
//! * [`metrics`]: `metrics.jsonl` and traffic counters; [`progress`]: the live line.

pub mod config;
pub mod metrics;
pub mod progress;
pub mod scheduler;
pub mod server;
pub mod state;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use proto::{JoinTicket, Welcome};
use tracing::{info, warn};
use trainer::Dataset;

pub use config::RunConfig;
pub use scheduler::Outcome;

/// Runs a training run to its end (or until Ctrl-C); returns how it ended.
pub async fn run(cfg: RunConfig) -> Result<Outcome> {
    let dir = cfg.run.output_dir.clone();
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    trainer::runtime::set_threads(cfg.training.threads);
    let identity = state::RunIdentity::load_or_create(&dir)?;
    let split = Dataset::load_split(&cfg.data.dir)
        .with_context(|| format!("loading the data set from {}", cfg.data.dir.display()))?;
    let n_params = trainer::Net::new(cfg.model.kind, tch::Device::Cpu, cfg.run.seed).n_params();
    let welcome = Welcome {
        run_id: identity.run_id,
        model: cfg.model.kind.name().to_string(),
        n_params: n_params as u64,
        dataset: "fashion-mnist".into(),
        dataset_digest: split.train.digest(),
        codec: cfg.compression.clone(),
        deterministic_threads: cfg.workers.deterministic_threads,
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
    let limits = proto::tls::TransportLimits {
        idle_timeout: Duration::from_secs_f64(cfg.network.idle_timeout_s),
        ..Default::default()
    };
    let endpoint = proto::tls::server_endpoint(&identity.tls, cfg.run.listen, &limits)?;
    let bound = endpoint.local_addr()?;
    let addr = match &cfg.run.public_addr {
        Some(a) => a.clone(),
        None if bound.ip().is_unspecified() => {
            warn!("listening on {bound}; set run.public_addr so remote workers get a reachable address");
            format!("127.0.0.1:{}", bound.port())
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
    let ctx = Arc::new(server::ServerCtx::new(
        identity.secret,
        welcome,
        tx.clone(),
        cfg.network.max_frame_bytes,
        Duration::from_secs_f64(cfg.network.handshake_timeout_s),
        cfg.network.max_workers,
        traffic.clone(),
    ));
    let accept = tokio::spawn(server::accept_loop(endpoint.clone(), ctx));
    let stop_tx = tx.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            info!("Ctrl-C: saving a checkpoint and stopping");
            let _ = stop_tx.send(server::Event::Stop);
        }
    });
    drop(tx);
    let sched = scheduler::Scheduler::new(
        cfg,
        identity.run_id,
        rx,
        split.train.len(),
        split.test,
        traffic,
    )?;
    let outcome = tokio::task::spawn_blocking(move || sched.run()).await??;
    // Let the shutdown messages reach the workers before the endpoint goes away.
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    endpoint.close(proto::close::DONE.into(), b"run over");
    accept.abort();
    Ok(outcome)
}
