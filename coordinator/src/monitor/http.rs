//! The HTTP side of the status server, on axum.
//!
//! | Path | Method | What |
//! |---|---|---|
//! | `/` | GET | the dashboard (HTML; `/dashboard.js` draws it from the JSON API) |
//! | `/api/status` | GET | [`Status`](super::Status) as JSON |
//! | `/api/workers` | GET | [`WorkerRow`](super::WorkerRow)s as JSON |
//! | `/api/history` | GET | [`History`](super::History) (loss and evaluation curves) as JSON |
//! | `/metrics` | GET | Prometheus / OpenMetrics text |
//! | `/api/pause`, `/api/resume`, `/api/stop` | POST | operator actions |
//! | `/api/ban` | POST | `{"worker": "<64 hex>", "reason": "..."}` |
//!
//! Actions need `Authorization: Bearer <monitor_token of identity.json>` (RFC 6750); without
//! it they answer 401 and change nothing. Request bodies over 4 KiB are refused (413).
//! Connections are capped (64, 16 from one address), and each has 10 s to send its headers
//! and 60 s of life.
//! Nothing served contains the join secret.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use tracing::{debug, error, info};

use super::{Command, Monitor};

/// The page.
const DASHBOARD_HTML: &str = include_str!("dashboard.html");
/// The page's script: fetches the JSON API and draws the charts (no third-party code).
const DASHBOARD_JS: &str = include_str!("dashboard.js");

/// Largest request body accepted (a ban request is well under this).
const MAX_BODY: usize = 4096;
/// Characters of a ban reason kept.
const MAX_REASON: usize = 200;

/// Errors of starting the status server.
#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    /// The address cannot be listened on (taken, or not this machine's).
    #[error(
        "monitor.listen {addr}: cannot listen there ({source}); is another run or program \
         using that port? Choose a free address in [monitor] listen, or remove it to run \
         without the status server"
    )]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
}

/// Binds the status server's address (at start, so that a taken port is an error before the
/// run begins rather than a failure in the middle of it).
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, MonitorError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| MonitorError::Bind { addr, source })
}

/// Connections served at once; more are closed as they arrive.
const MAX_CONNECTIONS: usize = 64;
/// Connections served at once from one IP address (one client cannot take every slot).
const MAX_PER_PEER: usize = 16;
/// Time a client has to send a request's headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest life of one connection (a dashboard reconnects on its next poll).
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// A connection's place in the per-address count, given back when dropped.
struct PeerSlot {
    peers: Arc<std::sync::Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl PeerSlot {
    /// A place for one more connection from `ip`, if it has fewer than [`MAX_PER_PEER`].
    fn take(peers: &Arc<std::sync::Mutex<HashMap<IpAddr, usize>>>, ip: IpAddr) -> Option<Self> {
        let mut p = peers.lock().unwrap_or_else(|e| e.into_inner());
        let n = p.entry(ip).or_insert(0);
        if *n >= MAX_PER_PEER {
            return None;
        }
        *n += 1;
        Some(PeerSlot {
            peers: peers.clone(),
            ip,
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut p = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = p.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                p.remove(&self.ip);
            }
        }
    }
}

/// Serves `monitor` on `listener` until the process ends: at most [`MAX_CONNECTIONS`]
/// connections ([`MAX_PER_PEER`] from one address), each closed after [`CONNECTION_LIFETIME`] or when its headers take over
/// [`HEADER_TIMEOUT`], so that idle or half-sent requests cannot hold the coordinator's
/// file descriptors. A failure is logged; the run goes on.
pub fn spawn(listener: tokio::net::TcpListener, monitor: Arc<Monitor>) {
    if let Ok(a) = listener.local_addr() {
        info!("status server on http://{a}/");
    }
    let app = router(monitor);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let peers = Arc::new(std::sync::Mutex::new(HashMap::new()));
    tokio::spawn(async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors, or the like: wait and go on.
                    error!("status server: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                debug!("status server: {MAX_CONNECTIONS} connections open; closing a new one");
                continue;
            };
            let Some(peer_slot) = PeerSlot::take(&peers, peer.ip()) else {
                debug!(%peer, "status server: {MAX_PER_PEER} connections from this address; closing a new one");
                continue;
            };
            let service = hyper_util::service::TowerToHyperService::new(app.clone());
            tokio::spawn(async move {
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                if let Ok(Err(e)) = tokio::time::timeout(CONNECTION_LIFETIME, conn).await {
                    debug!("status server connection: {e}");
                }
                drop((slot, peer_slot));
            });
        }
    });
}

/// The routes.
pub fn router(monitor: Arc<Monitor>) -> Router {
    Router::new()
        .route("/", get(dashboard))
        .route("/dashboard.js", get(script))
        .route("/api/status", get(api_status))
        .route("/api/workers", get(api_workers))
        .route("/api/history", get(api_history))
        .route("/metrics", get(metrics))
        .route(
            "/api/pause",
            post(|s, h, b| action(s, h, b, ActionKind::Pause)),
        )
        .route(
            "/api/resume",
            post(|s, h, b| action(s, h, b, ActionKind::Resume)),
        )
        .route(
            "/api/stop",
            post(|s, h, b| action(s, h, b, ActionKind::Stop)),
        )
        .route("/api/ban", post(|s, h, b| action(s, h, b, ActionKind::Ban)))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(monitor)
}

type Shared = State<Arc<Monitor>>;

fn no_store(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    r
}

async fn dashboard() -> Response {
    let mut r = no_store(
        (
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            DASHBOARD_HTML,
        )
            .into_response(),
    );
    r.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'",
        ),
    );
    r
}

async fn script() -> Response {
    no_store(
        (
            [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
            DASHBOARD_JS,
        )
            .into_response(),
    )
}

async fn api_status(State(m): Shared) -> Response {
    no_store(Json(m.snapshot().status.clone()).into_response())
}

async fn api_workers(State(m): Shared) -> Response {
    no_store(Json(m.snapshot().workers.clone()).into_response())
}

async fn api_history(State(m): Shared) -> Response {
    no_store(Json(m.snapshot().history.clone()).into_response())
}

async fn metrics(State(m): Shared) -> Response {
    no_store(
        (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            m.metrics_text(),
        )
            .into_response(),
    )
}

#[derive(Clone, Copy, Debug)]
enum ActionKind {
    Pause,
    Resume,
    Stop,
    Ban,
}

/// The body of `/api/ban`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BanRequest {
    worker: String,
    #[serde(default)]
    reason: String,
}

fn refuse(code: StatusCode, message: &str) -> Response {
    let mut r = (code, Json(json!({ "error": message }))).into_response();
    if code == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"dtrain\""),
        );
    }
    r
}

/// The token of an `Authorization` header value: scheme `Bearer`, any case (RFC 7235 §2.1).
fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(token)
}

/// An operator action: the declared size and the token first, then the body, then the
/// scheduler.
async fn action(State(m): Shared, headers: HeaderMap, body: Body, kind: ActionKind) -> Response {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return refuse(StatusCode::PAYLOAD_TOO_LARGE, "the body is over 4 KiB");
    }
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer);
    match token {
        Some(t) if m.authorized(t) => {}
        Some(_) => {
            debug!(
                ?kind,
                "status server: an action with a wrong token was refused"
            );
            return refuse(StatusCode::UNAUTHORIZED, "wrong token");
        }
        None => {
            return refuse(
                StatusCode::UNAUTHORIZED,
                "actions need Authorization: Bearer <monitor_token from the run's identity.json>",
            )
        }
    }
    let body = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(b) => b,
        // A body sent without a length (chunked) that runs over.
        Err(e) if e.to_string().contains("length limit") => {
            return refuse(StatusCode::PAYLOAD_TOO_LARGE, "the body is over 4 KiB")
        }
        Err(e) => return refuse(StatusCode::BAD_REQUEST, &format!("reading the body: {e}")),
    };
    let cmd = match kind {
        ActionKind::Pause => Command::Pause,
        ActionKind::Resume => Command::Resume,
        ActionKind::Stop => Command::Stop,
        ActionKind::Ban => {
            let req: BanRequest = match serde_json::from_slice(&body) {
                Ok(r) => r,
                Err(e) => {
                    return refuse(
                        StatusCode::BAD_REQUEST,
                        &format!(
                        "expected {{\"worker\": \"<64 hex digits>\", \"reason\": \"...\"}}: {e}"
                    ),
                    )
                }
            };
            let Ok(worker) = req.worker.trim().parse() else {
                return refuse(
                    StatusCode::BAD_REQUEST,
                    "worker must be a key as 64 hex digits (see /api/workers)",
                );
            };
            let reason: String = req
                .reason
                .chars()
                .filter(|c| !c.is_control())
                .take(MAX_REASON)
                .collect();
            Command::Ban { worker, reason }
        }
    };
    info!(?cmd, "status server: operator action");
    if m.command(cmd) {
        (StatusCode::ACCEPTED, Json(json!({ "ok": true }))).into_response()
    } else {
        refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "the run is no longer running",
        )
    }
}
