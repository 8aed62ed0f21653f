//! Reaching the coordinator: the join string's `HOST:PORT` is resolved, each resolved
//! address gets a client socket of its own family (IPv4 or IPv6), and all of them are tried
//! at once; the first handshake that completes wins. A host name that resolves to both
//! families thus works whichever one the coordinator listens on.
//!
//! The decisions (which failures can heal by retrying) are pure functions of the error; the
//! I/O around them is thin.

use std::io;
use std::net::SocketAddr;

/// Whether a failure to reach the coordinator can heal by retrying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Heal {
    /// It may work later (the coordinator is down or restarting, a lost packet, a busy
    /// resolver).
    Retry,
    /// This machine has no route to (or no socket of) the address's family. Before the worker
    /// ever joined, that will not change by waiting: the worker stops. Once it has worked,
    /// it is a network outage and the worker keeps retrying.
    NoRoute,
    /// The address can never be reached (malformed, port 0, unspecified): the worker stops.
    Never,
}

/// What to do after every address failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Try again after a pause.
    Retry(String),
    /// Stop the worker with this message.
    Stop(String),
}

/// The failures of one attempt to reach the coordinator (over all its addresses).
#[derive(Debug, Default)]
pub struct Failures {
    never: Vec<String>,
    retry: Vec<String>,
    no_route: Vec<String>,
}

impl Failures {
    /// Notes one failure.
    pub fn note(&mut self, heal: Heal, message: String) {
        match heal {
            Heal::Never => self.never.push(message),
            Heal::Retry => self.retry.push(message),
            Heal::NoRoute => self.no_route.push(message),
        }
    }

    /// What to do: stop when a failure can never heal (the coordinator refused us, the
    /// address is malformed), else retry when any can, else (only routes missing) stop,
    /// unless the worker `joined` the run before, when it waits for the network to return.
    pub fn verdict(self, joined: bool) -> Verdict {
        if !self.never.is_empty() {
            return Verdict::Stop(self.never.join("; "));
        }
        if !self.retry.is_empty() {
            return Verdict::Retry(self.retry.join("; "));
        }
        let msg = if self.no_route.is_empty() {
            "no address to try".to_string()
        } else {
            self.no_route.join("; ")
        };
        if joined {
            Verdict::Retry(msg)
        } else {
            Verdict::Stop(format!(
                "{msg} (this machine has no route of that address family; nothing to retry)"
            ))
        }
    }
}

/// Resolved addresses in resolver order, without repeats.
pub fn candidates(resolved: impl IntoIterator<Item = SocketAddr>) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = Vec::new();
    for a in resolved {
        if !out.contains(&a) {
            out.push(a);
        }
    }
    out
}

/// What a failure to resolve the join string's host means.
pub fn resolve_error(e: &io::Error) -> Heal {
    match e.kind() {
        // Not a HOST:PORT the resolver can read.
        io::ErrorKind::InvalidInput => Heal::Never,
        // Anything else (no network yet, a resolver that does not answer, an unknown name
        // that DNS may learn) may pass.
        _ => Heal::Retry,
    }
}

/// What a failure to open a socket toward an address, or to find a route to it, means.
pub fn socket_error(e: &io::Error) -> Heal {
    // The OS has no sockets of that address family (no IPv6 stack, say).
    #[cfg(unix)]
    if e.raw_os_error() == Some(libc::EAFNOSUPPORT) {
        return Heal::NoRoute;
    }
    match e.kind() {
        io::ErrorKind::NetworkUnreachable
        | io::ErrorKind::HostUnreachable
        | io::ErrorKind::AddrNotAvailable => Heal::NoRoute,
        // An address the OS refuses outright (such as a link-local one without its
        // interface).
        io::ErrorKind::InvalidInput => Heal::Never,
        _ => Heal::Retry,
    }
}

/// What quinn refusing to start a connection means.
pub fn connect_error(e: &quinn::ConnectError) -> Heal {
    match e {
        quinn::ConnectError::EndpointStopping | quinn::ConnectError::CidsExhausted => Heal::Retry,
        // Port 0, an unspecified address, a wrong family, or a configuration this worker
        // cannot change.
        _ => Heal::Never,
    }
}

/// Asks the OS for a route to `addr` without sending anything (a UDP `connect`): fails at
/// once when this machine has no socket or no route of `addr`'s family.
pub fn route_probe(addr: SocketAddr) -> io::Result<()> {
    let s = std::net::UdpSocket::bind(proto::tls::unspecified_like(addr))?;
    s.connect(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_go_and_the_order_stays() {
        let a: SocketAddr = "[::1]:7".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:7".parse().unwrap();
        assert_eq!(candidates([a, b, a, b]), vec![a, b]);
    }

    #[test]
    fn only_failures_that_can_pass_are_retried() {
        let os = io::Error::from_raw_os_error;
        let kind = |k: io::ErrorKind| io::Error::new(k, "x");
        assert_eq!(
            resolve_error(&kind(io::ErrorKind::InvalidInput)),
            Heal::Never
        );
        assert_eq!(resolve_error(&kind(io::ErrorKind::Other)), Heal::Retry);
        #[cfg(unix)]
        assert_eq!(socket_error(&os(libc::EAFNOSUPPORT)), Heal::NoRoute);
        assert_eq!(
            socket_error(&kind(io::ErrorKind::NetworkUnreachable)),
            Heal::NoRoute
        );
        assert_eq!(
            socket_error(&kind(io::ErrorKind::AddrNotAvailable)),
            Heal::NoRoute
        );
        assert_eq!(
            socket_error(&kind(io::ErrorKind::InvalidInput)),
            Heal::Never
        );
        assert_eq!(socket_error(&kind(io::ErrorKind::Interrupted)), Heal::Retry);
        assert_eq!(
            connect_error(&quinn::ConnectError::InvalidRemoteAddress(
                "0.0.0.0:7".parse().unwrap()
            )),
            Heal::Never
        );
        assert_eq!(
            connect_error(&quinn::ConnectError::EndpointStopping),
            Heal::Retry
        );
    }

    #[test]
    fn a_refusal_stops_a_possible_success_retries_a_missing_route_stops_before_joining() {
        let with = |notes: &[(Heal, &str)], joined: bool| {
            let mut f = Failures::default();
            for (h, m) in notes {
                f.note(*h, m.to_string());
            }
            f.verdict(joined)
        };
        let refused = (Heal::Never, "refused");
        let timeout = (Heal::Retry, "timed out");
        let no_v6 = (Heal::NoRoute, "no route to [2001:db8::1]:7");
        assert_eq!(
            with(&[timeout, refused], true),
            Verdict::Stop("refused".into())
        );
        assert_eq!(
            with(&[no_v6, timeout], false),
            Verdict::Retry("timed out".into())
        );
        assert!(
            matches!(with(&[no_v6], false), Verdict::Stop(m) if m.contains("no route to [2001:db8::1]:7"))
        );
        assert!(matches!(with(&[no_v6], true), Verdict::Retry(_)));
    }

    #[test]
    fn a_route_to_loopback_is_found() {
        route_probe("127.0.0.1:9".parse().unwrap()).unwrap();
    }
}
