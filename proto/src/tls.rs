//! QUIC endpoints over rustls (TLS 1.3 only).
//!
//! The coordinator presents a self-signed certificate; workers pin its blake3 fingerprint
//! (carried in the join string) instead of trusting any CA. The handshake signature is still
//! verified against the pinned certificate's key, so holding the certificate alone is not
//! enough to impersonate the coordinator.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use crate::ALPN;

/// Errors while setting up TLS or QUIC.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Certificate generation failed.
    #[error("certificate generation failed: {0}")]
    Cert(#[from] rcgen::Error),
    /// rustls refused the configuration.
    #[error("tls configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// quinn refused the configuration or could not bind.
    #[error("quic endpoint: {0}")]
    Quic(String),
    /// The client socket could not be bound (say, no IPv6 on this machine).
    #[error("cannot open a UDP socket on {0}: {1}")]
    Bind(SocketAddr, #[source] std::io::Error),
    /// Reading or writing identity files failed.
    #[error("identity files: {0}")]
    Io(#[from] std::io::Error),
}

/// The coordinator's TLS identity: a self-signed certificate and its private key (both DER).
#[derive(Clone)]
pub struct Identity {
    /// Certificate, DER.
    pub cert_der: Vec<u8>,
    /// PKCS#8 private key, DER.
    pub key_der: Vec<u8>,
}

impl Identity {
    /// Generates a fresh self-signed certificate.
    pub fn generate() -> Result<Self, TlsError> {
        let ck = rcgen::generate_simple_self_signed(vec!["dtrain-coordinator".to_string()])?;
        Ok(Identity {
            cert_der: ck.cert.der().to_vec(),
            key_der: ck.key_pair.serialize_der(),
        })
    }

    /// blake3 fingerprint of the certificate, the value workers pin.
    pub fn fingerprint(&self) -> [u8; 32] {
        fingerprint(&self.cert_der)
    }
}

/// blake3 of a DER certificate.
pub fn fingerprint(cert_der: &[u8]) -> [u8; 32] {
    *blake3::hash(cert_der).as_bytes()
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Transport limits shared by both sides.
#[derive(Clone, Copy, Debug)]
pub struct TransportLimits {
    /// A connection silent for this long is closed.
    pub idle_timeout: Duration,
    /// Keep-alive pings are sent this often.
    pub keep_alive: Duration,
    /// Per-stream receive window in bytes (what a peer can make us buffer before the
    /// application reads; the connection window is twice that).
    pub stream_window: u32,
    /// Largest UDP payload path-MTU discovery may try, and the largest this side accepts
    /// (announced to the peer as `max_udp_payload_size`, RFC 9000 section 18.2, which caps
    /// the peer's discovery).
    pub max_udp_payload: u16,
    /// UDP socket send and receive buffers asked for, in bytes (the kernel caps them at
    /// `net.core.rmem_max` / `wmem_max`).
    pub socket_buffer: usize,
}

impl Default for TransportLimits {
    fn default() -> Self {
        TransportLimits {
            idle_timeout: Duration::from_secs(30),
            // Often enough for any idle timeout a coordinator may choose (it is negotiated
            // down to the smaller of the two sides').
            keep_alive: Duration::from_secs(1),
            // Enough for 100 Mbit/s at 300 ms round trips, and a bound on what one peer can
            // make the coordinator buffer.
            stream_window: 4 << 20,
            // Ten of them (quinn's largest segmentation-offload batch) fit in one 64 KiB
            // UDP send: with larger datagrams the batch fails with EMSGSIZE, which quinn-udp
            // drops silently, and black-hole detection then falls back to 1200 bytes.
            max_udp_payload: 6_400,
            // A burst of one 4 MiB frame on a fast path: the default 208 KiB receive buffer
            // overflows on loopback (a 3.4 MB frame each way lost ~14% of its packets), and
            // each loss halves the congestion window.
            socket_buffer: 4 << 20,
        }
    }
}

fn transport(limits: &TransportLimits) -> Result<Arc<quinn::TransportConfig>, TlsError> {
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(limits.idle_timeout)
            .map_err(|e| TlsError::Quic(e.to_string()))?,
    ));
    t.keep_alive_interval(Some(limits.keep_alive));
    t.stream_receive_window(quinn::VarInt::from_u32(limits.stream_window));
    t.receive_window(quinn::VarInt::from_u32(
        limits.stream_window.saturating_mul(2),
    ));
    t.send_window(u64::from(limits.stream_window) * 2);
    // Path-MTU discovery may climb above quinn's 1452-byte default where the path allows
    // it (loopback, LANs with jumbo frames): fewer packets, syscalls and AEAD calls per
    // megabyte. It stops at what the peer announces (`endpoint_config`); on internet paths
    // the probes fail and the path stays near 1452 bytes.
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(limits.max_udp_payload);
    t.mtu_discovery_config(Some(mtu));
    // One control stream per connection, and a worker's data streams.
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(1 + crate::DATA_STREAMS));
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    Ok(Arc::new(t))
}

/// What `conn` can send now, in bytes a second, as its congestion controller sees it: the
/// congestion window over the smoothed round-trip time (the window is the controller's
/// estimate of the path's bandwidth-delay product, RFC 9002 section 7). An underestimate
/// early in a connection (slow start; before its first sample quinn assumes a 333 ms round
/// trip) and on queueing links, which only makes senders compress more
/// ([`compression::ZstdPolicy`]). `None` if the round-trip time reads zero.
pub fn send_rate(conn: &quinn::Connection) -> Option<f64> {
    let path = conn.stats().path;
    let rtt = path.rtt.as_secs_f64();
    (rtt > 0.0).then(|| path.cwnd as f64 / rtt)
}

/// A server endpoint bound to `addr`, presenting `identity`.
pub fn server_endpoint(
    identity: &Identity,
    addr: SocketAddr,
    limits: &TransportLimits,
) -> Result<quinn::Endpoint, TlsError> {
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(identity.key_der.clone()));
    let cert = CertificateDer::from(identity.cert_der.clone());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(transport(limits)?);
    endpoint(addr, false, limits, Some(cfg))
        .map_err(|e| TlsError::Quic(format!("bind {addr}: {e}")))
}

/// An endpoint (a server when `server` is given) on a [`udp_socket`] bound to `addr`,
/// taking datagrams of up to `limits.max_udp_payload` bytes: quinn's default endpoint
/// config, 1472 bytes, would hold the peer's path-MTU discovery to Ethernet size even on
/// loopback.
fn endpoint(
    addr: SocketAddr,
    dual_stack: bool,
    limits: &TransportLimits,
    server: Option<quinn::ServerConfig>,
) -> std::io::Result<quinn::Endpoint> {
    let mut config = quinn::EndpointConfig::default();
    config
        .max_udp_payload_size(limits.max_udp_payload)
        .map_err(std::io::Error::other)?;
    let runtime = quinn::default_runtime()
        .ok_or_else(|| std::io::Error::other("no async runtime to run the endpoint on"))?;
    let socket = udp_socket(addr, dual_stack, limits)?;
    quinn::Endpoint::new(config, server, socket, runtime)
}

/// A UDP socket bound to `addr` with [`TransportLimits::socket_buffer`]-sized buffers (as
/// far as the kernel allows; a refusal leaves its defaults). `dual_stack`: an IPv6 socket
/// made to reach IPv4 addresses too, as `quinn::Endpoint::client` makes it; otherwise the
/// system's default (as `std::net::UdpSocket::bind`).
fn udp_socket(
    addr: SocketAddr,
    dual_stack: bool,
    limits: &TransportLimits,
) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() && dual_stack {
        if let Err(e) = s.set_only_v6(false) {
            tracing::debug!(%e, "unable to make the socket dual-stack");
        }
    }
    // Linux caps what it grants at net.core.rmem_max / wmem_max without an error (and
    // reports twice the size granted, its bookkeeping included).
    for (what, set, got, sysctl) in [
        (
            "receive",
            s.set_recv_buffer_size(limits.socket_buffer),
            s.recv_buffer_size(),
            "net.core.rmem_max",
        ),
        (
            "send",
            s.set_send_buffer_size(limits.socket_buffer),
            s.send_buffer_size(),
            "net.core.wmem_max",
        ),
    ] {
        match (set, got) {
            (Ok(()), Ok(n)) if n >= limits.socket_buffer => {}
            (Ok(()), Ok(n)) => tracing::debug!(
                "UDP {what} buffer: {n} bytes of {} asked for (raise {sysctl} for fast links)",
                limits.socket_buffer
            ),
            (Err(e), _) | (_, Err(e)) => {
                tracing::debug!(%e, "UDP {what} buffer left at the system default")
            }
        }
    }
    s.bind(&addr.into())?;
    Ok(s.into())
}

/// A client endpoint for connecting to `remote`: bound to an ephemeral port of `remote`'s
/// address family (an IPv4 socket cannot reach an IPv6 address, nor the reverse), whose
/// connections accept only the certificate with `fingerprint`.
pub fn client_endpoint(
    fingerprint: [u8; 32],
    limits: &TransportLimits,
    remote: SocketAddr,
) -> Result<quinn::Endpoint, TlsError> {
    let provider = provider();
    let verifier = Arc::new(PinnedCert {
        fingerprint,
        provider: provider.clone(),
    });
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(transport(limits)?);
    let bind = unspecified_like(remote);
    let mut ep = endpoint(bind, true, limits, None).map_err(|e| TlsError::Bind(bind, e))?;
    ep.set_default_client_config(cfg);
    Ok(ep)
}

/// The unspecified address, port 0, of `addr`'s family: what a client socket for `addr` binds.
pub fn unspecified_like(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    }
}

/// Accepts exactly one certificate, identified by its blake3 fingerprint.
#[derive(Debug)]
struct PinnedCert {
    fingerprint: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got = fingerprint(end_entity.as_ref());
        if got == self.fingerprint {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "coordinator certificate fingerprint mismatch: join string pins {}, server presented {}",
                hex::encode(self.fingerprint),
                hex::encode(got)
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn try_connect(server: &Identity, pin: [u8; 32], on: &str) -> Result<(), String> {
        let limits = TransportLimits::default();
        let ep = server_endpoint(server, on.parse().unwrap(), &limits).unwrap();
        let addr = ep.local_addr().unwrap();
        let accept = tokio::spawn(async move {
            if let Some(inc) = ep.accept().await {
                let _ = inc.await;
            }
        });
        let client = client_endpoint(pin, &limits, addr).unwrap();
        let res = match client.connect(addr, "dtrain").unwrap().await {
            Ok(_) => Ok(()),
            Err(e) => Err(e.to_string()),
        };
        accept.abort();
        res
    }

    /// Sends `total` bytes on one stream to a reader that first stalls (so the whole
    /// receive window fills with out-of-band chunks) and then reads in small pieces with
    /// pauses; returns the bytes received or the connection error.
    /// Bytes the lagging reader got, and the datagram size the sender's path reached.
    async fn lagging_transfer(
        limits: TransportLimits,
        total: usize,
    ) -> Result<(usize, u16), String> {
        let mtu = Arc::new(std::sync::atomic::AtomicU16::new(0));
        let reached = mtu.clone();
        let id = Identity::generate().unwrap();
        let ep = server_endpoint(&id, "127.0.0.1:0".parse().unwrap(), &limits).unwrap();
        let addr = ep.local_addr().unwrap();
        let sender = tokio::spawn(async move {
            let conn = ep.accept().await.unwrap().await.unwrap();
            let (mut send, _recv) = conn.open_bi().await.unwrap();
            let block = vec![7u8; 1 << 20];
            let mut left = total;
            while left > 0 {
                let n = left.min(block.len());
                send.write_all(&block[..n])
                    .await
                    .map_err(|e| e.to_string())?;
                left -= n;
            }
            send.finish().map_err(|e| e.to_string())?;
            reached.store(
                conn.stats().path.current_mtu,
                std::sync::atomic::Ordering::SeqCst,
            );
            let _ = conn.closed().await;
            Ok::<(), String>(())
        });
        let client = client_endpoint(id.fingerprint(), &limits, addr).unwrap();
        let conn = client
            .connect(addr, "dtrain")
            .unwrap()
            .await
            .map_err(|e| e.to_string())?;
        let (_send, mut recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut got = 0usize;
        let mut buf = vec![0u8; 16 << 10];
        let mut reads = 0u64;
        loop {
            match recv.read(&mut buf).await {
                Ok(Some(n)) => got += n,
                Ok(None) => break,
                Err(e) => return Err(format!("after {got} bytes: {e}")),
            }
            reads += 1;
            if reads.is_multiple_of(64) {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        conn.close(0u32.into(), b"done");
        sender.abort();
        Ok((got, mtu.load(std::sync::atomic::Ordering::SeqCst)))
    }

    /// quinn-proto can close a connection with "too many gaps in stream buffer" when a
    /// lagging reader leaves many small, well-filled packets buffered (quinn issue 2809):
    /// parameter and update transfers of large models must survive a slow reader, both
    /// with the largest datagrams a path may take here (loopback) and with the smallest.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn large_transfers_survive_a_lagging_reader() {
        let total = 48 << 20;
        // The largest datagrams this side uses, and the smallest QUIC allows.
        for max_udp_payload in [TransportLimits::default().max_udp_payload, 1_200] {
            let limits = TransportLimits {
                max_udp_payload,
                ..TransportLimits::default()
            };
            let (got, mtu) = lagging_transfer(limits, total)
                .await
                .unwrap_or_else(|e| panic!("datagrams up to {max_udp_payload} bytes: {e}"));
            assert_eq!(got, total, "datagrams up to {max_udp_payload} bytes");
            if max_udp_payload > 1500 {
                // Loopback takes them: discovery must get past Ethernet's 1500 bytes.
                assert!(mtu > 1500, "the path stayed at {mtu}-byte datagrams");
            }
        }
    }

    #[tokio::test]
    async fn pinned_fingerprint_connects_and_other_is_refused() {
        let id = Identity::generate().unwrap();
        try_connect(&id, id.fingerprint(), "127.0.0.1:0")
            .await
            .unwrap();
        let other = Identity::generate().unwrap();
        let err = try_connect(&id, other.fingerprint(), "127.0.0.1:0")
            .await
            .unwrap_err();
        assert!(err.contains("fingerprint mismatch"), "{err}");
    }

    #[tokio::test]
    async fn a_client_reaches_a_server_on_ipv6() {
        if std::net::UdpSocket::bind("[::1]:0").is_err() {
            eprintln!("skipped: this machine has no IPv6 loopback");
            return;
        }
        let id = Identity::generate().unwrap();
        try_connect(&id, id.fingerprint(), "[::1]:0").await.unwrap();
    }
}
