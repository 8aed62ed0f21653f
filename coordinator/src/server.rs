//! The QUIC side of the coordinator: accepts connections, runs the handshake, then relays
//! frames between each worker and the scheduler thread.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Duration;

use proto::{
    close, read_frame, read_preamble, write_frame, write_preamble, ToCoordinator, ToWorker, Welcome,
};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tracing::{debug, info, info_span, warn, Instrument};
use verify::WorkerId;

use crate::metrics::Traffic;

/// What the connection tasks tell the scheduler.
pub enum Event {
    /// A worker completed the handshake.
    Joined {
        /// Connection number (unique within this coordinator process).
        conn: u64,
        /// Its public key.
        worker: WorkerId,
        /// Its self-reported name and device.
        name: String,
        /// Where to send it messages.
        tx: UnboundedSender<Outgoing>,
        /// Its traffic counters.
        traffic: Arc<Traffic>,
    },
    /// A worker's connection ended.
    Left {
        /// Connection number.
        conn: u64,
        /// Why.
        reason: String,
    },
    /// A worker sent a message.
    Message {
        /// Connection number.
        conn: u64,
        /// The message.
        msg: Box<ToCoordinator>,
    },
    /// The operator asked the run to stop (Ctrl-C).
    Stop,
}

/// What the scheduler sends to a connection task.
pub enum Outgoing {
    /// A message to write.
    Msg(Box<ToWorker>),
    /// Close the connection with an application code and reason.
    Close(u32, String),
}

/// Settings and shared state of the accept loop.
pub struct ServerCtx {
    /// Expected join secret.
    pub secret: [u8; 32],
    /// Sent to every accepted worker.
    pub welcome: Welcome,
    /// Where events go.
    pub events: Sender<Event>,
    /// Largest frame accepted from a worker.
    pub max_frame: u64,
    /// Time allowed for the handshake.
    pub handshake_timeout: Duration,
    /// Most workers at once.
    pub max_workers: usize,
    /// Traffic of all connections.
    pub traffic: Arc<Traffic>,
    next_conn: AtomicU64,
    live: AtomicUsize,
}

impl ServerCtx {
    /// Bundles the accept loop's settings.
    pub fn new(
        secret: [u8; 32],
        welcome: Welcome,
        events: Sender<Event>,
        max_frame: u64,
        handshake_timeout: Duration,
        max_workers: usize,
        traffic: Arc<Traffic>,
    ) -> Self {
        ServerCtx {
            secret,
            welcome,
            events,
            max_frame,
            handshake_timeout,
            max_workers,
            traffic,
            next_conn: AtomicU64::new(1),
            live: AtomicUsize::new(0),
        }
    }
}

/// Accepts connections until the endpoint is closed.
pub async fn accept_loop(endpoint: quinn::Endpoint, ctx: Arc<ServerCtx>) {
    while let Some(incoming) = endpoint.accept().await {
        let ctx = ctx.clone();
        let conn_no = ctx.next_conn.fetch_add(1, Ordering::Relaxed);
        let span = info_span!("conn", n = conn_no, peer = %incoming.remote_address());
        tokio::spawn(
            async move {
                if let Err(reason) = serve(incoming, conn_no, &ctx).await {
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

async fn serve(incoming: quinn::Incoming, conn_no: u64, ctx: &ServerCtx) -> Result<(), String> {
    let conn = tokio::time::timeout(ctx.handshake_timeout, incoming)
        .await
        .map_err(|_| "TLS handshake timed out".to_string())?
        .map_err(|e| {
            warn!("TLS handshake failed: {e}");
            e.to_string()
        })?;
    let reject = |code: u32, reason: String| {
        warn!("refusing worker: {reason}");
        conn.close(code.into(), reason.as_bytes());
        Err::<(), String>(reason)
    };
    let hs = tokio::time::timeout(ctx.handshake_timeout, async {
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
    if ctx.live.fetch_add(1, Ordering::SeqCst) >= ctx.max_workers {
        ctx.live.fetch_sub(1, Ordering::SeqCst);
        return reject(
            close::FULL,
            format!("run is full ({} workers)", ctx.max_workers),
        );
    }
    let name: String = format!(
        "{}@{}",
        hello.name.chars().take(64).collect::<String>(),
        hello.device.chars().take(16).collect::<String>()
    );
    let traffic = Arc::new(Traffic::default());
    let welcome = ToWorker::Welcome(ctx.welcome.clone());
    let result = async {
        let n = write_frame(&mut send, &welcome, u64::MAX)
            .await
            .map_err(|e| e.to_string())?;
        ctx.traffic.add_out(n + 8);
        traffic.add_out(n + 8);
        let (tx, rx) = unbounded_channel();
        info!(worker = %hello.worker_id.short(), %name, "worker joined");
        ctx.events
            .send(Event::Joined {
                conn: conn_no,
                worker: hello.worker_id,
                name,
                tx,
                traffic: traffic.clone(),
            })
            .map_err(|_| "scheduler gone".to_string())?;
        let writer = tokio::spawn(write_loop(
            conn.clone(),
            send,
            rx,
            ctx.traffic.clone(),
            traffic.clone(),
        ));
        let reason = read_loop(&conn, &mut recv, conn_no, ctx, &traffic).await;
        writer.abort();
        Ok::<String, String>(reason)
    }
    .await;
    ctx.live.fetch_sub(1, Ordering::SeqCst);
    let reason = result.unwrap_or_else(|e| e);
    info!("worker left: {reason}");
    let _ = ctx.events.send(Event::Left {
        conn: conn_no,
        reason: reason.clone(),
    });
    Err(reason)
}

async fn read_loop(
    conn: &quinn::Connection,
    recv: &mut quinn::RecvStream,
    conn_no: u64,
    ctx: &ServerCtx,
    traffic: &Traffic,
) -> String {
    loop {
        match read_frame::<_, ToCoordinator>(recv, ctx.max_frame).await {
            Ok((ToCoordinator::Hello(_), _)) => {
                conn.close(close::PROTOCOL.into(), b"unexpected second Hello");
                return "protocol error: second Hello".into();
            }
            Ok((msg, n)) => {
                ctx.traffic.add_in(n);
                traffic.add_in(n);
                if ctx
                    .events
                    .send(Event::Message {
                        conn: conn_no,
                        msg: Box::new(msg),
                    })
                    .is_err()
                {
                    return "scheduler gone".into();
                }
            }
            Err(proto::FrameError::Io(e)) => return format!("connection lost: {e}"),
            Err(e) => {
                let reason = format!("protocol error: {e}");
                warn!("{reason}");
                conn.close(close::PROTOCOL.into(), reason.as_bytes());
                return reason;
            }
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
