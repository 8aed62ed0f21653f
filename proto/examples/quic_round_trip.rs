//! Times one frame's worth of bytes each way over a loopback QUIC connection set up as the
//! coordinator and workers set theirs up (`proto::tls`), after a pause like a round's
//! compute: `cargo run --release -p proto --example quic_round_trip [BYTES]` (default
//! 3,400,000: an fp32 update of the 850k-parameter Llama demo). Prints the median of 35
//! round trips and the path's statistics (datagram size, losses, congestion events).

use std::error::Error;
use std::time::{Duration, Instant};

use proto::tls::{client_endpoint, server_endpoint, Identity, TransportLimits};

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let n: usize = match std::env::args().nth(1) {
        Some(a) => a.parse()?,
        None => 3_400_000,
    };
    if n == 0 {
        return Err("BYTES must be at least 1".into());
    }
    let id = Identity::generate()?;
    let limits = TransportLimits::default();
    let server = server_endpoint(&id, "127.0.0.1:0".parse()?, &limits)?;
    let addr = server.local_addr()?;
    // The echo side: reads a frame, sends it back.
    tokio::spawn(async move {
        let Some(incoming) = server.accept().await else {
            return;
        };
        let Ok(conn) = incoming.await else { return };
        let Ok((mut send, mut recv)) = conn.accept_bi().await else {
            return;
        };
        let mut buf = vec![0u8; n];
        while recv.read_exact(&mut buf).await.is_ok() {
            if send.write_all(&buf).await.is_err() {
                return;
            }
        }
    });
    let client = client_endpoint(id.fingerprint(), &limits, addr)?;
    let conn = client.connect(addr, "dtrain")?.await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    let out = vec![7u8; n];
    let mut back = vec![0u8; n];
    let mut ms = Vec::new();
    for i in 0..40 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let t = Instant::now();
        send.write_all(&out).await?;
        recv.read_exact(&mut back).await?;
        // The first few warm the path up (slow start, path-MTU discovery).
        if i >= 5 {
            ms.push(t.elapsed().as_secs_f64() * 1000.0);
        }
    }
    ms.sort_by(f64::total_cmp);
    let p = conn.stats().path;
    println!(
        "{n} bytes each way: median round trip {:.2} ms; datagrams of {} bytes, {} lost, {} congestion events",
        ms[ms.len() / 2],
        p.current_mtu,
        p.lost_packets,
        p.congestion_events
    );
    Ok(())
}
