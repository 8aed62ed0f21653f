//! A volunteer worker: joins a run with a join string, computes its share of every step,
//! and reconnects with backoff when the link drops.

#[cfg(feature = "test-hooks")]
pub mod adversary;
pub mod cache;
pub mod cli;
pub mod compute;
pub mod dial;
pub mod fetch;
#[cfg(feature = "test-hooks")]
pub mod hostile;
pub mod shards;
pub mod status;
#[cfg(feature = "test-hooks")]
pub mod test_hooks;
pub mod uplink;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::{
    close, read_frame, read_preamble, write_frame, write_preamble, Hello, JoinTicket,
    ToCoordinator, ToWorker,
};
use tracing::{info, warn};
use trainer::{Dataset, ModelSpec, TrainData};
use verify::{ComputeClass, WorkerKey};

use compute::Compute;

/// What the worker writes to its stream: a message, or (a hostile test worker only) raw bytes.
pub enum Send {
    /// A framed message.
    Msg(ToCoordinator),
    /// Bytes written as they are.
    #[cfg(feature = "test-hooks")]
    Raw(Vec<u8>),
    /// A data request on a new data stream, its answer ignored.
    #[cfg(feature = "test-hooks")]
    Data(proto::DataRequest),
}

/// How a worker was started.
#[derive(Clone, Debug)]
pub struct WorkerOptions {
    /// Where to connect.
    pub ticket: JoinTicket,
    /// A folder that may hold the run's data files (checked by hash; what is missing is
    /// downloaded).
    pub data_dir: Option<PathBuf>,
    /// The data cache.
    pub cache: fetch::CacheOptions,
    /// Most compute threads (`--max-threads`; `None`: libtorch's default).
    pub threads: Option<usize>,
    /// File of the worker's persistent key.
    pub key_path: PathBuf,
    /// Name shown to the coordinator.
    pub name: String,
    /// Use a GPU when one is usable.
    pub allow_cuda: bool,
    /// Stop retrying after failing to reach the coordinator for this long.
    pub retry_for: Duration,
    /// The volunteer's cap on the worker's uplink, megabits per second.
    pub max_upload_mbps: Option<f64>,
    /// Becomes true when the volunteer asks the worker to stop (Ctrl-C, SIGTERM): it
    /// finishes and sends the task it is computing, then leaves the run.
    pub stop: tokio::sync::watch::Receiver<bool>,
    /// What the status line shows (updated as the worker goes).
    pub stats: Arc<status::Stats>,
    /// TEST ONLY: misbehaviours on purpose.
    #[cfg(feature = "test-hooks")]
    pub hooks: test_hooks::TestHooks,
}

impl WorkerOptions {
    /// The protocol version this worker announces.
    fn protocol_version(&self) -> u32 {
        #[cfg(feature = "test-hooks")]
        if let Some(v) = self.hooks.protocol_version {
            return v;
        }
        proto::PROTOCOL_VERSION
    }
}

/// Why a session ended.
#[derive(Debug)]
enum SessionError {
    /// Retrying cannot help (wrong secret, version, fingerprint, data).
    Fatal(String),
    /// Try again after a pause.
    Retry(String),
}

/// Why the worker stopped, when it stopped cleanly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// The coordinator said the run is over (or is stopping).
    Done(String),
    /// The volunteer stopped the worker.
    Stopped,
}

/// Errors that end the worker.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The coordinator refused us, or we refused it; retrying cannot help.
    #[error("{0}")]
    Refused(String),
    /// The coordinator stayed unreachable.
    #[error("gave up after {0:?} without reaching the coordinator: {1}")]
    GaveUp(Duration, String),
    /// Local set-up failed.
    #[error("{0}")]
    Setup(String),
}

/// Runs the worker until the run ends or an unrecoverable error.
pub async fn run(opts: WorkerOptions) -> Result<Exit, WorkerError> {
    trainer::runtime::set_threads(opts.threads);
    let key = WorkerKey::load_or_create(&opts.key_path)
        .map_err(|e| WorkerError::Setup(format!("key {}: {e}", opts.key_path.display())))?;
    let device = trainer::runtime::pick_device(opts.allow_cuda);
    let class = executor::class::detect(device, tch::get_num_threads().max(1) as u32);
    info!(id = %key.public().short(), device = %trainer::runtime::device_name(device), class = %class.label(), "worker starting");
    let mut backoff = Duration::from_millis(250);
    let mut failing_since: Option<Instant> = None;
    let mut state = SessionState::default();
    loop {
        if *opts.stop.borrow() {
            return Ok(Exit::Stopped);
        }
        let mut progressed = false;
        match session(&opts, &key, device, &class, &mut progressed, &mut state).await {
            Ok(exit) => return Ok(exit),
            Err(SessionError::Fatal(msg)) => return Err(WorkerError::Refused(msg)),
            Err(SessionError::Retry(msg)) => {
                if progressed {
                    backoff = Duration::from_millis(250);
                    failing_since = None;
                }
                let since = *failing_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= opts.retry_for {
                    return Err(WorkerError::GaveUp(opts.retry_for, msg));
                }
                let jitter = Duration::from_millis(rand_jitter(backoff.as_millis() as u64 / 4 + 1));
                warn!(
                    "{msg}; reconnecting in {:.1}s",
                    (backoff + jitter).as_secs_f64()
                );
                let mut stop = opts.stop.clone();
                tokio::select! {
                    _ = tokio::time::sleep(backoff + jitter) => {}
                    _ = stop.wait_for(|s| *s) => return Ok(Exit::Stopped),
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

fn rand_jitter(max: u64) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(0);
    nanos % max.max(1)
}

/// Replaces this process by a new one of the same program and arguments with the portable
/// deterministic settings in its environment (libtorch, MKL and oneDNN read them only when
/// they start); returns only when that fails.
fn restart_portable() -> SessionError {
    use std::os::unix::process::CommandExt;
    info!("the run computes in the portable deterministic mode: restarting with its settings");
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => return SessionError::Fatal(format!("cannot find this program to restart: {e}")),
    };
    let err = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .envs(executor::class::PORTABLE_ENV)
        .exec();
    SessionError::Fatal(format!(
        "could not restart with the portable settings ({err}); start the worker with {}",
        executor::class::PORTABLE_ENV
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    ))
}

/// Maps a connection error to retry-or-not, reading the coordinator's close reason.
fn classify(e: &quinn::ConnectionError) -> SessionError {
    match e {
        quinn::ConnectionError::ApplicationClosed(ac) => {
            let reason = String::from_utf8_lossy(&ac.reason).to_string();
            let code = ac.error_code.into_inner() as u32;
            match code {
                close::VERSION | close::AUTH => {
                    SessionError::Fatal(format!("coordinator refused this worker: {reason}"))
                }
                close::DONE => SessionError::Fatal(format!("run is over: {reason}")),
                _ => SessionError::Retry(format!("coordinator closed the connection: {reason}")),
            }
        }
        // A failed TLS handshake (crypto error range): the certificate is not the pinned one.
        quinn::ConnectionError::TransportError(t)
            if (0x100..0x200).contains(&u64::from(t.code)) =>
        {
            SessionError::Fatal(format!("refusing to connect: {t}"))
        }
        other => SessionError::Retry(format!("connection lost: {other}")),
    }
}

/// What outlives one connection.
#[derive(Default)]
struct SessionState {
    /// Whether this process ever joined the run (then a lost route is an outage to wait out).
    joined: bool,
    tasks_seen: u64,
    /// The training data loaded for a run, with the digest it was checked against.
    data: Option<Loaded>,
    /// The run's compute state (model, parameters, error feedback), reused on reconnecting to
    /// the same run.
    compute: Option<Compute>,
    #[cfg(feature = "test-hooks")]
    tamper: Option<hostile::Tamper>,
}

/// The training data of a run, with the digest it was checked against.
struct Loaded {
    digest: [u8; 32],
    data: Arc<TrainData>,
    /// A language-model run's shards, loaded as tasks need them.
    shards: Option<Arc<shards::LazyShards>>,
}

/// The files a worker needs before its first task: all of an image run's; only the
/// manifest of a language-model run (its shards come as tasks need them).
fn join_files(welcome: &proto::Welcome) -> Vec<proto::DataFile> {
    let manifest = trainer::tokens::MANIFEST;
    match welcome.dataset.as_str() {
        "tokens" => welcome
            .data_files
            .iter()
            .filter(|f| f.name == manifest)
            .cloned()
            .collect(),
        _ => welcome.data_files.clone(),
    }
}

/// Loads the run's training data from `dir` (the IDX files, or the manifest of the token
/// shards, as the coordinator says) and checks it against the run's digest.
fn load_data(
    dir: &std::path::Path,
    welcome: &proto::Welcome,
    spec: &ModelSpec,
) -> Result<(TrainData, Option<shards::LazyShards>), SessionError> {
    let fatal = |m: String| SessionError::Fatal(m);
    let mut lazy = None;
    let data: TrainData = match (welcome.dataset.as_str(), spec) {
        ("fashion-mnist", ModelSpec::Cnn | ModelSpec::Mlp) => Dataset::load_idx(dir, "train")
            .map_err(|e| fatal(e.to_string()))?
            .into(),
        ("tokens", ModelSpec::Llama(c)) => {
            if welcome.seq_len == 0 || welcome.seq_len > c.max_position_embeddings {
                return Err(fatal(format!(
                    "coordinator sent seq_len {} for a model of max_position_embeddings {}",
                    welcome.seq_len, c.max_position_embeddings
                )));
            }
            let (shards, windows) = shards::LazyShards::open(
                dir,
                &welcome.data_files,
                welcome.seq_len as usize,
                c.vocab_size,
            )
            .map_err(fatal)?;
            lazy = Some(shards);
            TrainData::Tokens(windows)
        }
        (other, _) => {
            return Err(fatal(format!(
                "the run's data set {other:?} does not fit its {} model; update the worker",
                spec.name()
            )))
        }
    };
    if data.digest() != welcome.dataset_digest {
        return Err(fatal(format!(
            "the files the coordinator lists do not make its {} data set; the coordinator \
             is faulty",
            welcome.dataset
        )));
    }
    Ok((data, lazy))
}

/// A failed fetch: a lost link is retried, anything else ends the worker.
fn fetch_error(conn: &quinn::Connection, e: fetch::FetchError) -> SessionError {
    match (e, conn.close_reason()) {
        (fetch::FetchError::Link(_), Some(reason)) => classify(&reason),
        (fetch::FetchError::Link(m), None) => {
            SessionError::Retry(format!("fetching the run's data: {m}"))
        }
        (e, _) => SessionError::Fatal(e.to_string()),
    }
}

/// Checks the coordinator's list of data files: how many, plain unique names.
fn check_files(files: &[proto::DataFile]) -> Result<(), String> {
    if files.is_empty() || files.len() > proto::MAX_DATA_FILES {
        return Err(format!(
            "the coordinator lists {} data files, expected 1..={}",
            files.len(),
            proto::MAX_DATA_FILES
        ));
    }
    let mut names = std::collections::HashSet::new();
    for f in files {
        let n = &f.name;
        if n.is_empty() || n.len() > 255 || n.contains(['/', '\\', '\0']) || n.starts_with('.') {
            return Err(format!("the coordinator lists a data file named {n:?}"));
        }
        if !names.insert(n.as_str()) {
            return Err(format!("the coordinator lists the data file {n:?} twice"));
        }
        if f.len > proto::MAX_DATA_FILE_LEN {
            return Err(format!(
                "the coordinator lists {n:?} of {} bytes, more than {}",
                f.len,
                proto::MAX_DATA_FILE_LEN
            ));
        }
    }
    Ok(())
}

async fn session(
    opts: &WorkerOptions,
    key: &WorkerKey,
    device: tch::Device,
    class: &ComputeClass,
    progressed: &mut bool,
    state: &mut SessionState,
) -> Result<Exit, SessionError> {
    let retry = |m: String| SessionError::Retry(m);
    let stats = &opts.stats;
    stats.set_phase(status::Phase::Connecting);
    let mut stop = opts.stop.clone();
    let (_endpoint, conn) = tokio::select! {
        c = connect(&opts.ticket, state.joined) => c?,
        _ = stop.wait_for(|s| *s) => {
            info!("stopped by the volunteer while connecting");
            return Ok(Exit::Stopped);
        }
    };
    let closed = |conn: &quinn::Connection, what: String| match conn.close_reason() {
        Some(e) => classify(&e),
        None => retry(what),
    };
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| classify(&e))?;
    let hello = ToCoordinator::Hello(Box::new(Hello {
        secret: opts.ticket.secret,
        worker_id: key.public(),
        name: opts.name.clone(),
        class: class.clone(),
    }));
    write_preamble(&mut send, opts.protocol_version())
        .await
        .map_err(|e| closed(&conn, e.to_string()))?;
    write_frame(&mut send, &hello, 1 << 16)
        .await
        .map_err(|e| closed(&conn, e.to_string()))?;
    let v = read_preamble(&mut recv)
        .await
        .map_err(|e| closed(&conn, e.to_string()))?;
    if v != opts.protocol_version() {
        return Err(SessionError::Fatal(format!(
            "coordinator speaks protocol v{v}, this worker v{}; update the worker",
            opts.protocol_version()
        )));
    }
    let cap = 1u64 << 30;
    let welcome = match read_frame::<_, ToWorker>(&mut recv, cap).await {
        Ok((ToWorker::Welcome(w), _)) => w,
        Ok(_) => return Err(retry("expected Welcome".into())),
        Err(e) => return Err(closed(&conn, e.to_string())),
    };
    let model = ModelSpec::from_json(&welcome.model).map_err(|e| {
        SessionError::Fatal(format!(
            "the coordinator's model is not one this worker knows ({e}); update the worker"
        ))
    })?;
    if welcome.portable && !class.portable {
        conn.close(
            quinn::VarInt::from_u32(close::DONE),
            b"restarting with the portable settings",
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        return Err(restart_portable());
    }
    let (data, lazy) = match &state.data {
        Some(l) if l.digest == welcome.dataset_digest => (l.data.clone(), l.shards.clone()),
        _ => {
            check_files(&welcome.data_files).map_err(SessionError::Fatal)?;
            let files = join_files(&welcome);
            let gather = fetch::gather(
                &conn,
                &files,
                opts.data_dir.as_deref(),
                &opts.cache,
                progressed,
            );
            // No task is in hand yet: a stop ends the download at once (it resumes later).
            let mut stop = opts.stop.clone();
            stats.set_phase(status::Phase::Downloading);
            let gathered = tokio::select! {
                g = gather => g.map_err(|e| fetch_error(&conn, e))?,
                _ = stop.wait_for(|s| *s) => return Ok(leave(&conn, stats).await),
            };
            stats.received(gathered.downloaded);
            let (dir, w, m) = (gathered.dir().to_path_buf(), welcome.clone(), model.clone());
            let (d, lazy) = tokio::task::spawn_blocking(move || load_data(&dir, &w, &m))
                .await
                .map_err(|e| SessionError::Fatal(format!("loading the data: {e}")))??;
            drop(gathered);
            let loaded = Loaded {
                digest: welcome.dataset_digest,
                data: Arc::new(d),
                shards: lazy.map(Arc::new),
            };
            let out = (loaded.data.clone(), loaded.shards.clone());
            state.data = Some(loaded);
            out
        }
    };
    // The class the coordinator expects: the declared one at the run's forced thread count.
    let mut class = class.clone();
    if let Some(t) = welcome.deterministic_threads {
        if let Some(max) = opts.threads.filter(|&m| t as usize > m) {
            return Err(SessionError::Fatal(format!(
                "the run computes with {t} threads (for its bit-exact checks), more than \
                 --max-threads {max}; raise --max-threads to join it"
            )));
        }
        trainer::runtime::set_threads(Some(t as usize));
        class.threads = t;
    }
    welcome
        .codec
        .validate()
        .map_err(|e| SessionError::Fatal(format!("coordinator sent an invalid codec: {e}")))?;
    let inner = inner_optimizer(&welcome.inner_optimizer).map_err(SessionError::Fatal)?;
    if !state
        .compute
        .as_ref()
        .is_some_and(|c| c.same_run(&welcome.run_id, &welcome.codec, &inner))
    {
        let compute = Compute::new(
            &model,
            device,
            data.clone(),
            key.clone(),
            welcome.run_id,
            welcome.codec,
            inner,
        );
        #[cfg(feature = "test-hooks")]
        let compute = compute.with_adversary(
            opts.hooks
                .adversary
                .map(|(m, rate)| adversary::Adversary::new(m, rate)),
        );
        state.compute = Some(compute);
    }
    let n_params = state.compute.as_ref().map_or(0, |c| c.n_params());
    if n_params as u64 != welcome.n_params {
        return Err(SessionError::Fatal(
            "model size differs from the coordinator's; update the worker".into(),
        ));
    }
    if let Some(c) = state.compute.as_mut() {
        c.set_class(class.digest());
    }
    #[cfg(feature = "test-hooks")]
    if state.tamper.is_none() {
        state.tamper = opts.hooks.hostile.map(hostile::Tamper::new);
    }
    write_frame(&mut send, &ToCoordinator::Ready, cap)
        .await
        .map_err(|e| closed(&conn, e.to_string()))?;
    state.joined = true;
    stats.set_phase(status::Phase::Idle);
    info!(run = %hex::encode(&welcome.run_id[..8]), model = model.name(), params = n_params, "joined run");
    let mut pacer = opts
        .max_upload_mbps
        .map(|m| uplink::Pacer::new(m, Instant::now()));
    let mut stop = opts.stop.clone();
    loop {
        let read = read_frame::<_, ToWorker>(&mut recv, cap);
        let msg = tokio::select! {
            r = read => match r {
                Ok((m, n)) => {
                    stats.received(n);
                    m
                }
                Err(e) => return Err(closed(&conn, e.to_string())),
            },
            _ = stop.wait_for(|s| *s) => return Ok(leave(&conn, stats).await),
        };
        let replies = match msg {
            ToWorker::Task(task) => {
                state.tasks_seen += 1;
                stats.set_standing(task.standing);
                #[cfg(feature = "test-hooks")]
                opts.hooks.crash_if_due(state.tasks_seen);
                let task_id = task.task_id;
                if let (Some(lazy), TrainData::Tokens(windows)) = (&lazy, data.as_ref()) {
                    let missing = windows.missing(&task.indices);
                    if !missing.is_empty() {
                        let from = (opts.data_dir.as_deref(), &opts.cache);
                        stats.set_phase(status::Phase::Downloading);
                        let n = lazy
                            .load(&conn, &missing, windows, from, progressed)
                            .await
                            .map_err(|e| fetch_error(&conn, e))?;
                        stats.received(n);
                        info!(
                            shards = missing.len(),
                            downloaded = n,
                            "loaded the shards a task needs"
                        );
                    }
                    let ahead = windows.unloaded(&task.prefetch);
                    if !ahead.is_empty() && task.prefetch.len() <= proto::MAX_PREFETCH {
                        let from = (opts.data_dir.clone(), opts.cache.clone());
                        shards::prefetch(lazy.clone(), data.clone(), conn.clone(), ahead, from);
                    }
                }
                let mut c = state
                    .compute
                    .take()
                    .ok_or_else(|| retry("compute state lost".into()))?;
                #[cfg(feature = "test-hooks")]
                let slowdown = opts.hooks.slowdown;
                stats.set_phase(status::Phase::Training);
                // What the result can go out at: the link, or the volunteer's cap.
                let upload_cap = pacer.as_ref().map(uplink::Pacer::rate);
                let link = match (proto::tls::send_rate(&conn), upload_cap) {
                    (Some(l), Some(c)) => Some(l.min(c)),
                    (l, c) => l.or(c),
                };
                let (c, res) = tokio::task::spawn_blocking(move || {
                    #[cfg(feature = "test-hooks")]
                    let started = Instant::now();
                    let r = c.run(task, link);
                    #[cfg(feature = "test-hooks")]
                    let r = test_hooks::TestHooks::stretch(slowdown, started, r);
                    (c, r)
                })
                .await
                .map_err(|e| SessionError::Fatal(format!("compute thread failed: {e}")))?;
                state.compute = Some(c);
                *progressed = true;
                stats.set_phase(status::Phase::Idle);
                if let Ok(r) = &res {
                    stats.task_done(u64::from(r.n_samples), r.compute_us);
                }
                match res {
                    #[cfg(feature = "test-hooks")]
                    Ok(r) if state.tamper.is_some() => state
                        .tamper
                        .as_mut()
                        .map_or_else(Vec::new, |t| t.tamper(r, n_params, key)),
                    Ok(r) => vec![Send::Msg(ToCoordinator::Result(Box::new(r)))],
                    Err(f) => {
                        warn!(task_id, "task failed: {}", f.reason);
                        vec![Send::Msg(ToCoordinator::TaskFailed {
                            task_id,
                            reason: f.reason,
                            need_full_params: f.need_full_params,
                        })]
                    }
                }
            }
            ToWorker::Challenge {
                challenge_id,
                task_id,
                query,
            } => {
                let answer = match &state.compute {
                    Some(c) => c.answer(task_id, &query),
                    None => proto::Answer::Unavailable("no state".into()),
                };
                vec![Send::Msg(ToCoordinator::ChallengeReply {
                    challenge_id,
                    answer,
                })]
            }
            ToWorker::Shutdown { reason } => {
                info!("coordinator: {reason}");
                conn.close(close::DONE.into(), b"bye");
                return Ok(Exit::Done(reason));
            }
            ToWorker::Welcome(_) => return Err(retry("unexpected second Welcome".into())),
        };
        for reply in replies {
            let sent = match reply {
                Send::Msg(m) => uplink::send(&mut send, &m, cap, pacer.as_mut())
                    .await
                    .map(|n| stats.sent(n)),
                #[cfg(feature = "test-hooks")]
                Send::Raw(bytes) => send
                    .write_all(&bytes)
                    .await
                    .map_err(|e| proto::FrameError::Io(e.into())),
                #[cfg(feature = "test-hooks")]
                Send::Data(req) => match conn.open_bi().await {
                    Ok((mut s, _)) => write_frame(&mut s, &req, 1024).await.map(|_| ()),
                    Err(e) => Err(proto::FrameError::Io(std::io::Error::other(e))),
                },
            };
            sent.map_err(|e| closed(&conn, e.to_string()))?;
        }
        if *stop.borrow() {
            return Ok(leave(&conn, stats).await);
        }
    }
}

/// Leaves the run at the volunteer's request, after the task in hand was answered.
async fn leave(conn: &quinn::Connection, stats: &status::Stats) -> Exit {
    stats.set_phase(status::Phase::Stopping);
    info!("stopped by the volunteer: leaving the run");
    conn.close(close::DONE.into(), b"the volunteer stopped the worker");
    // Give the close a moment to leave before the endpoint goes away.
    tokio::time::sleep(Duration::from_millis(100)).await;
    Exit::Stopped
}

/// Connects to the coordinator of `ticket`: resolves its address and tries every resolved
/// address at once, each over a socket of its own family; the first completed handshake
/// wins. Returns the endpoint with the connection (the connection lives on the endpoint).
/// `joined`: whether this process joined the run before (then a lost route is retried).
async fn connect(
    ticket: &JoinTicket,
    joined: bool,
) -> Result<(quinn::Endpoint, quinn::Connection), SessionError> {
    use dial::Heal;
    let addr = &ticket.addr;
    let mut failures = dial::Failures::default();
    let resolved = match tokio::net::lookup_host(addr.as_str()).await {
        Ok(r) => dial::candidates(r),
        Err(e) => {
            failures.note(
                dial::resolve_error(&e),
                format!("cannot resolve {addr}: {e}"),
            );
            Vec::new()
        }
    };
    if resolved.is_empty() {
        failures.note(Heal::Retry, format!("{addr} resolves to nothing"));
    }
    let mut endpoints: Vec<quinn::Endpoint> = Vec::new();
    let mut attempts = tokio::task::JoinSet::new();
    for target in resolved {
        if let Err(e) = dial::route_probe(target) {
            failures.note(
                dial::socket_error(&e),
                format!("cannot reach {target}: {e}"),
            );
            continue;
        }
        let family = proto::tls::unspecified_like(target);
        let existing = endpoints.iter().find(|ep| {
            ep.local_addr()
                .is_ok_and(|a| proto::tls::unspecified_like(a) == family)
        });
        let endpoint = match existing {
            Some(ep) => ep.clone(),
            None => {
                match proto::tls::client_endpoint(ticket.fingerprint, &Default::default(), target) {
                    Ok(ep) => {
                        endpoints.push(ep.clone());
                        ep
                    }
                    Err(e) => {
                        let heal = match &e {
                            proto::tls::TlsError::Bind(_, io) => dial::socket_error(io),
                            _ => Heal::Never,
                        };
                        failures.note(heal, e.to_string());
                        continue;
                    }
                }
            }
        };
        match endpoint.connect(target, "dtrain") {
            Ok(connecting) => {
                attempts.spawn(async move { (target, endpoint, connecting.await) });
            }
            Err(e) => failures.note(
                dial::connect_error(&e),
                format!("cannot connect to {target}: {e}"),
            ),
        }
    }
    while let Some(attempt) = attempts.join_next().await {
        match attempt {
            // Dropping the set abandons the other attempts.
            Ok((_, endpoint, Ok(conn))) => return Ok((endpoint, conn)),
            Ok((target, _, Err(e))) => match classify(&e) {
                SessionError::Fatal(m) => failures.note(Heal::Never, m),
                SessionError::Retry(m) => failures.note(Heal::Retry, format!("{target}: {m}")),
            },
            Err(e) => failures.note(Heal::Retry, format!("connection attempt failed: {e}")),
        }
    }
    Err(match failures.verdict(joined) {
        dial::Verdict::Retry(m) => SessionError::Retry(m),
        dial::Verdict::Stop(m) => SessionError::Fatal(m),
    })
}

/// Checks the coordinator's inner optimizer settings and turns them into a config.
fn inner_optimizer(w: &proto::InnerOptimizer) -> Result<trainer::OptimizerConfig, String> {
    let kind = trainer::OptimizerKind::from_name(&w.kind)
        .ok_or_else(|| format!("unknown inner optimizer {:?}; update the worker", w.kind))?;
    let cfg = trainer::OptimizerConfig {
        kind,
        lr: w.lr,
        beta1: w.beta1,
        beta2: w.beta2,
        eps: w.eps,
        weight_decay: w.weight_decay,
        momentum: w.momentum,
        nesterov: w.nesterov,
    };
    cfg.validate()
        .map_err(|e| format!("coordinator sent an invalid inner optimizer: {e}"))?;
    Ok(cfg)
}
