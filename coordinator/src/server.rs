//! The QUIC side of the coordinator: accepts connections, runs the handshake, then relays
//! frames between each worker and the scheduler thread.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use proto::{
    close, read_frame, read_preamble, write_frame, write_preamble, ToCoordinator, ToWorker, Welcome,
};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::{debug, info, info_span, warn, Instrument};
use verify::WorkerId;

use crate::data_server::{ConnData, DataServer};
use crate::metrics::Traffic;

/// A worker that completed the handshake.
pub struct Joined {
    /// Connection number (unique within this coordinator process).
    pub conn: u64,
    /// Its public key.
    pub worker: WorkerId,
    /// Its self-reported name and device.
    pub name: String,
    /// The compute class it declared (strings bounded).
    pub class: verify::ComputeClass,
    /// Where to send it messages.
    pub tx: UnboundedSender<Outgoing>,
    /// Its traffic counters.
    pub traffic: Arc<Traffic>,
    /// Bytes of data files it fetched before it was ready.
    pub data_served: u64,
    /// Seconds from its Welcome to its Ready (the time it took to get the data).
    pub fetch_s: f64,
}

/// What the connection tasks and the checker thread tell the scheduler.
pub enum Event {
    /// A worker completed the handshake.
    Joined(Box<Joined>),
    /// A connection broke the protocol before its worker was ready (never `Joined`): the
    /// key gets a strike.
    Offence {
        /// Connection number.
        conn: u64,
        /// The key it presented.
        worker: WorkerId,
        /// What it did.
        reason: String,
    },
    /// A worker's connection ended.
    Left {
        /// Connection number.
        conn: u64,
        /// Why.
        reason: String,
        /// Whether the worker broke the protocol.
        offence: bool,
    },
    /// A worker sent a message.
    Message {
        /// Connection number.
        conn: u64,
        /// The message.
        msg: Box<ToCoordinator>,
        /// Held until the scheduler is done with the message: bounds what one connection
        /// can have queued.
        permit: OwnedSemaphorePermit,
    },
    /// The checker thread finished a re-execution.
    Checked(Box<crate::checks::Done>),
    /// The operator asked the run to stop (Ctrl-C, SIGTERM).
    Stop,
    /// The operator acted through the status server.
    Operator(crate::monitor::Command),
}

/// What the scheduler sends to a connection task.
pub enum Outgoing {
    /// A message to write.
    Msg(Box<ToWorker>),
    /// Close the connection with an application code and reason.
    Close(u32, String),
}

/// Limits applied to every connection.
#[derive(Clone, Copy, Debug)]
pub struct ConnLimits {
    /// Largest frame accepted from a worker.
    pub max_frame: u64,
    /// Time allowed for the handshake.
    pub handshake_timeout: Duration,
    /// Most workers at once.
    pub max_workers: usize,
    /// Handshakes in progress at once.
    pub max_handshakes: usize,
    /// Frames per second (burst: twice that).
    pub frames_per_s: f64,
    /// Bytes per second (burst: twice that).
    pub bytes_per_s: f64,
    /// New connections accepted per second from one UDP socket (burst: twice that; ten times
    /// that from one IP address).
    pub new_conns_per_s: f64,
}

/// Messages of one connection the scheduler may have queued.
const QUEUED_PER_CONN: usize = 4;

/// Settings and shared state of the accept loop.
pub struct ServerCtx {
    /// Expected join secret.
    pub secret: [u8; 32],
    /// Sent to every accepted worker.
    pub welcome: Welcome,
    /// Where events go.
    pub events: Sender<Event>,
    /// Limits.
    pub limits: ConnLimits,
    /// Traffic of all connections.
    pub traffic: Arc<Traffic>,
    /// Identities refused at the handshake.
    pub banned: Arc<RwLock<HashSet<WorkerId>>>,
    /// The data files served to workers.
    pub data: Arc<DataServer>,
    handshakes: Arc<Semaphore>,
    next_conn: AtomicU64,
    live: AtomicUsize,
}

impl ServerCtx {
    /// Bundles the accept loop's settings.
    pub fn new(
        secret: [u8; 32],
        welcome: Welcome,
        events: Sender<Event>,
        limits: ConnLimits,
        traffic: Arc<Traffic>,
        banned: Arc<RwLock<HashSet<WorkerId>>>,
        data: Arc<DataServer>,
    ) -> Self {
        ServerCtx {
            secret,
            welcome,
            events,
            data,
            handshakes: Arc::new(Semaphore::new(limits.max_handshakes)),
            limits,
            traffic,
            banned,
            next_conn: AtomicU64::new(1),
            live: AtomicUsize::new(0),
        }
    }
}

/// A token bucket: `rate` tokens a second, holding at most `cap` (`2 * rate` unless
/// made with [`Bucket::with_cap`]).
pub(crate) struct Bucket {
    rate: f64,
    cap: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    pub(crate) fn new(rate: f64) -> Self {
        Self::with_cap(rate, 2.0 * rate)
    }

    /// A bucket that starts full, holding at most `cap` tokens.
    pub(crate) fn with_cap(rate: f64, cap: f64) -> Self {
        Bucket {
            rate,
            cap,
            tokens: cap,
            at: Instant::now(),
        }
    }

    fn refill(&mut self) {
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.at).as_secs_f64() * self.rate).min(self.cap);
        self.at = now;
    }

    /// Whether the bucket is full (nothing to remember about its owner).
    fn full(&mut self) -> bool {
        self.refill();
        self.tokens >= self.cap
    }

    /// Takes one token if there is one.
    pub(crate) fn try_take(&mut self) -> bool {
        self.refill();
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Takes `n` tokens; returns how long to wait before going on (zero when they were there).
    pub(crate) fn take(&mut self, n: f64) -> Duration {
        self.refill();
        self.tokens -= n;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

/// Accepts connections until the endpoint is closed. New connections are refused at once
/// (cheaply, before any cryptography) beyond `max_handshakes` in progress, beyond
/// `new_conns_per_s` from one UDP socket (address and port), or beyond ten times that
/// from one IP address (many volunteers can share one behind a NAT, each with its own port).
pub async fn accept_loop(endpoint: quinn::Endpoint, ctx: Arc<ServerCtx>) {
    let rate = ctx.limits.new_conns_per_s;
    let mut per_socket: HashMap<SocketAddr, Bucket> = HashMap::new();
    let mut per_ip: HashMap<IpAddr, Bucket> = HashMap::new();
    while let Some(incoming) = endpoint.accept().await {
        let peer = incoming.remote_address();
        if per_socket.len() > 10_000 {
            per_socket.retain(|_, b| !b.full());
            per_ip.retain(|_, b| !b.full());
        }
        let socket_ok = per_socket
            .entry(peer)
            .or_insert_with(|| Bucket::new(rate))
            .try_take();
        if !socket_ok
            || !per_ip
                .entry(peer.ip())
                .or_insert_with(|| Bucket::new(10.0 * rate))
                .try_take()
        {
            debug!(%peer, "too many new connections from this address; refused");
            incoming.refuse();
            continue;
        }
        let Ok(permit) = ctx.handshakes.clone().try_acquire_owned() else {
            debug!(peer = %incoming.remote_address(), "too many handshakes in progress; refused");
            incoming.refuse();
            continue;
        };
        let ctx = ctx.clone();
        let conn_no = ctx.next_conn.fetch_add(1, Ordering::Relaxed);
        let span = info_span!("conn", n = conn_no, peer = %incoming.remote_address());
        tokio::spawn(
            async move {
                if let Err(reason) = serve(incoming, conn_no, &ctx, permit).await {
                    debug!("connection ended: {reason}");
                }
            }
            .instrument(span),
        );
    }
}

/// Constant-time comparison of two secrets (blake3 hashes compare in constant time).
fn secret_ok(a: &[u8; 32], b: &[u8; 32]) -> bool {
    blake3::hash(a) == blake3::hash(b)
}

async fn serve(
    incoming: quinn::Incoming,
    conn_no: u64,
    ctx: &ServerCtx,
    handshake: OwnedSemaphorePermit,
) -> Result<(), String> {
    let conn = tokio::time::timeout(ctx.limits.handshake_timeout, incoming)
        .await
        .map_err(|_| "TLS handshake timed out".to_string())?
        .map_err(|e| {
            warn!("TLS handshake failed: {e}");
            e.to_string()
        })?;
    let _close = CloseOnDrop(conn.clone());
    let reject = |code: u32, reason: String| {
        warn!("refusing worker: {reason}");
        conn.close(code.into(), reason.as_bytes());
        Err::<(), String>(reason)
    };
    let hs = tokio::time::timeout(ctx.limits.handshake_timeout, async {
        let (mut send, mut recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
        let v = read_preamble(&mut recv).await.map_err(|e| e.to_string())?;
        if v != proto::PROTOCOL_VERSION {
            return Ok(Err((
                close::VERSION,
                format!(
                    "protocol version mismatch: coordinator speaks v{}, worker v{v}",
                    proto::PROTOCOL_VERSION
                ),
            )));
        }
        write_preamble(&mut send, proto::PROTOCOL_VERSION)
            .await
            .map_err(|e| e.to_string())?;
        let (hello, n): (ToCoordinator, u64) = read_frame(&mut recv, 64 << 10)
            .await
            .map_err(|e| e.to_string())?;
        ctx.traffic.add_in(n + 8);
        Ok::<_, String>(Ok((send, recv, hello)))
    })
    .await;
    let (mut send, mut recv, hello) = match hs {
        Err(_) => return reject(close::TIMEOUT, "handshake timed out".into()),
        Ok(Err(e)) => return reject(close::PROTOCOL, format!("handshake failed: {e}")),
        Ok(Ok(Err((code, reason)))) => return reject(code, reason),
        Ok(Ok(Ok(x))) => x,
    };
    let ToCoordinator::Hello(hello) = hello else {
        return reject(
            close::PROTOCOL,
            "expected Hello as the first message".into(),
        );
    };
    if !secret_ok(&hello.secret, &ctx.secret) {
        return reject(close::AUTH, "wrong join secret".into());
    }
    let banned = ctx
        .banned
        .read()
        .map(|b| b.contains(&hello.worker_id))
        .unwrap_or(true);
    if banned {
        return reject(close::AUTH, "this worker is banned from the run".into());
    }
    drop(handshake);
    if ctx.live.fetch_add(1, Ordering::SeqCst) >= ctx.limits.max_workers {
        ctx.live.fetch_sub(1, Ordering::SeqCst);
        return reject(
            close::FULL,
            format!("run is full ({} workers)", ctx.limits.max_workers),
        );
    }
    if let Err(e) = hello.class.validate() {
        return reject(
            close::VERSION,
            format!(
                "invalid compute class: {e}; check the worker's ATEN_CPU_CAPABILITY, MKL_CBWR \
                 and ONEDNN_MAX_CPU_ISA settings, or update the worker"
            ),
        );
    }
    let class = hello.class.clone();
    let name = format!(
        "{}@{}",
        printable(&hello.name, 64),
        printable(&class.device, 16)
    );
    let traffic = Arc::new(Traffic::default());
    let offence: Arc<std::sync::Mutex<Option<String>>> = Arc::default();
    let welcome = ToWorker::Welcome(ctx.welcome.clone());
    let result = async {
        let n = write_frame(&mut send, &welcome, u64::MAX)
            .await
            .map_err(|e| e.to_string())?;
        ctx.traffic.add_out(n + 8);
        traffic.add_out(n + 8);
        let data = tokio::spawn(data_loop(
            conn.clone(),
            ctx.data.clone(),
            ctx.traffic.clone(),
            traffic.clone(),
            offence.clone(),
        ));
        let _stop_data = AbortOnDrop(data);
        let welcomed = Instant::now();
        // Until it holds the data, the worker only fetches; then it says it is ready, within
        // a minute plus the data set at 256 kbit/s.
        let deadline = Duration::from_secs_f64(60.0 + ctx.data.total() as f64 / 32_000.0);
        let ready = read_frame::<_, ToCoordinator>(&mut recv, 1024);
        match tokio::time::timeout(deadline, ready).await {
            Ok(Ok((ToCoordinator::Ready, n))) => traffic.add_in(n),
            Ok(Ok(_)) => {
                conn.close(close::PROTOCOL.into(), b"expected Ready");
                return Ok(Ended {
                    reason: "protocol error: expected Ready".into(),
                    offence: true,
                    joined: false,
                });
            }
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => {
                conn.close(close::TIMEOUT.into(), b"not ready in time");
                return Err(format!("not ready within {:.0} s", deadline.as_secs_f64()));
            }
        }
        let data_served = traffic.data();
        // What its first task's parameters go out at (the data it fetched warmed the path).
        traffic.set_send_rate(proto::tls::send_rate(&conn));
        let (tx, rx) = unbounded_channel();
        info!(worker = %hello.worker_id.short(), %name, data_served, "worker joined");
        ctx.events
            .send(Event::Joined(Box::new(Joined {
                conn: conn_no,
                worker: hello.worker_id,
                name,
                class,
                tx,
                traffic: traffic.clone(),
                data_served,
                fetch_s: welcomed.elapsed().as_secs_f64(),
            })))
            .map_err(|_| "scheduler gone".to_string())?;
        let mut writer = tokio::spawn(write_loop(
            conn.clone(),
            send,
            rx,
            ctx.traffic.clone(),
            traffic.clone(),
        ));
        let ended = read_loop(&conn, &mut recv, conn_no, ctx, &traffic).await;
        // Still open, the connection may have the scheduler's last message queued (a close
        // that says whether the run is over or only stopped, when the scheduler has gone
        // away): it goes out first.
        if conn.close_reason().is_none() {
            let _ = tokio::time::timeout(Duration::from_secs(1), &mut writer).await;
        }
        writer.abort();
        Ok::<Ended, String>(ended)
    }
    .await;
    ctx.live.fetch_sub(1, Ordering::SeqCst);
    let mut ended = result.unwrap_or_else(|reason| Ended {
        reason,
        offence: false,
        joined: false,
    });
    if let Some(reason) = offence.lock().ok().and_then(|mut o| o.take()) {
        ended.reason = reason;
        ended.offence = true;
    }
    if ended.offence && !ended.joined {
        let _ = ctx.events.send(Event::Offence {
            conn: conn_no,
            worker: hello.worker_id,
            reason: ended.reason.clone(),
        });
    }
    info!("worker left: {}", ended.reason);
    let _ = ctx.events.send(Event::Left {
        conn: conn_no,
        reason: ended.reason.clone(),
        offence: ended.offence,
    });
    Err(ended.reason)
}

/// At most `n` characters of `s` without control characters: what a peer chose, as shown in
/// logs, metrics, the dashboard and `coordinator status`.
fn printable(s: &str, n: usize) -> String {
    s.chars().filter(|c| !c.is_control()).take(n).collect()
}

/// Closes the connection with GOING_AWAY when dropped, unless it is closed already: quinn
/// closes a connection whose handles are all gone with code 0, which is DONE ("the run is
/// over") to a worker, and a worker told that stops for good.
struct CloseOnDrop(quinn::Connection);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        if self.0.close_reason().is_none() {
            self.0.close(
                close::GOING_AWAY.into(),
                b"the coordinator ended this connection; reconnect",
            );
        }
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Serves the data streams of one connection, one task per stream (at most
/// [`proto::DATA_STREAMS`] at once: QUIC's stream limit). A refused request closes the
/// connection as a protocol offence, recorded in `offence`.
async fn data_loop(
    conn: quinn::Connection,
    data: Arc<DataServer>,
    total: Arc<Traffic>,
    mine: Arc<Traffic>,
    offence: Arc<std::sync::Mutex<Option<String>>>,
) {
    let state = Arc::new(std::sync::Mutex::new(ConnData::default()));
    let uploads = Arc::new(Semaphore::new(crate::data_server::UPLOADS_PER_CONN));
    let mut streams = tokio::task::JoinSet::new();
    while let Ok((send, recv)) = conn.accept_bi().await {
        let (data, state, total, mine) = (data.clone(), state.clone(), total.clone(), mine.clone());
        let (conn, offence, uploads) = (conn.clone(), offence.clone(), uploads.clone());
        streams.spawn(async move {
            match data.serve_stream(send, recv, &state, &uploads).await {
                Ok(n) => {
                    total.add_data(n);
                    mine.add_data(n);
                }
                Err(r) => {
                    let reason = format!("data request refused: {}", r.reason);
                    warn!("{reason}");
                    if let Ok(mut o) = offence.lock() {
                        o.get_or_insert(reason.clone());
                    }
                    // Let the refusal reach the worker before the close overtakes it.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    conn.close(close::PROTOCOL.into(), reason.as_bytes());
                }
            }
        });
        while streams.try_join_next().is_some() {}
    }
}

/// How a connection ended.
struct Ended {
    reason: String,
    /// The peer broke the protocol.
    offence: bool,
    /// The scheduler knew it (it got as far as `Joined`).
    joined: bool,
}

async fn read_loop(
    conn: &quinn::Connection,
    recv: &mut quinn::RecvStream,
    conn_no: u64,
    ctx: &ServerCtx,
    traffic: &Traffic,
) -> Ended {
    let queued = Arc::new(Semaphore::new(QUEUED_PER_CONN));
    let mut frames = Bucket::new(ctx.limits.frames_per_s);
    let mut bytes = Bucket::new(ctx.limits.bytes_per_s);
    let offence = |reason: String| {
        warn!("{reason}");
        conn.close(close::PROTOCOL.into(), reason.as_bytes());
        Ended {
            reason,
            offence: true,
            joined: true,
        }
    };
    loop {
        // At most QUEUED_PER_CONN messages of this connection wait for the scheduler; until
        // one is handled nothing more is read, and QUIC flow control holds the peer back.
        let Ok(permit) = queued.clone().acquire_owned().await else {
            return Ended {
                reason: "closing".into(),
                offence: false,
                joined: true,
            };
        };
        match read_frame::<_, ToCoordinator>(recv, ctx.limits.max_frame).await {
            Ok((ToCoordinator::Hello(_), _)) => {
                return offence("protocol error: second Hello".into());
            }
            Ok((ToCoordinator::Ready, _)) => {
                return offence("protocol error: second Ready".into());
            }
            Ok((msg, n)) => {
                ctx.traffic.add_in(n);
                traffic.add_in(n);
                let pause = frames.take(1.0).max(bytes.take(n as f64));
                if !pause.is_zero() {
                    debug!(?pause, "rate cap: slowing this connection down");
                    tokio::time::sleep(pause).await;
                }
                // What the next task's parameters go out at, measured as each message
                // (a result, mostly) arrives.
                traffic.set_send_rate(proto::tls::send_rate(conn));
                if ctx
                    .events
                    .send(Event::Message {
                        conn: conn_no,
                        msg: Box::new(msg),
                        permit,
                    })
                    .is_err()
                {
                    return Ended {
                        reason: "scheduler gone".into(),
                        offence: false,
                        joined: true,
                    };
                }
            }
            Err(proto::FrameError::Io(e)) => {
                // How the connection ended (the worker's close and its reason, an idle
                // timeout) says more than the read error, which only says that it did.
                let reason = match conn.close_reason() {
                    Some(why) => format!("connection ended: {}", printable(&why.to_string(), 200)),
                    None => format!("connection lost: {e}"),
                };
                return Ended {
                    reason,
                    offence: false,
                    joined: true,
                };
            }
            Err(e) => return offence(format!("protocol error: {e}")),
        }
    }
}

async fn write_loop(
    conn: quinn::Connection,
    mut send: quinn::SendStream,
    mut rx: UnboundedReceiver<Outgoing>,
    total: Arc<Traffic>,
    mine: Arc<Traffic>,
) {
    while let Some(out) = rx.recv().await {
        match out {
            Outgoing::Msg(msg) => match write_frame(&mut send, msg.as_ref(), u64::MAX).await {
                Ok(n) => {
                    total.add_out(n);
                    mine.add_out(n);
                }
                Err(e) => {
                    debug!("write failed: {e}");
                    return;
                }
            },
            Outgoing::Close(code, reason) => {
                let _ = send.finish();
                // Give the last frames a moment to leave before the close overtakes them.
                tokio::time::sleep(Duration::from_millis(50)).await;
                conn.close(code.into(), reason.as_bytes());
                return;
            }
        }
    }
}
