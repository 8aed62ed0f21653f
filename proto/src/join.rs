//! Join strings: `dtrain://SECRET@HOST:PORT/FINGERPRINT`, with the 32-byte join secret and
//! the coordinator certificate's blake3 fingerprint in lowercase hex.

use std::fmt;
use std::str::FromStr;

/// Everything a worker needs to join a run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JoinTicket {
    /// `host:port` of the coordinator.
    pub addr: String,
    /// blake3 of the coordinator certificate (DER).
    pub fingerprint: [u8; 32],
    /// The run's join secret.
    pub secret: [u8; 32],
}

/// Why a join string was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JoinError {
    /// Wrong scheme or layout.
    #[error("a join string looks like dtrain://SECRET@HOST:PORT/FINGERPRINT ({0})")]
    Format(&'static str),
    /// A hex field has the wrong length or characters.
    #[error("bad {0} in join string: expected 64 hex characters")]
    Hex(&'static str),
    /// The address is not HOST:PORT with a host name, an IPv4 address or a bracketed IPv6
    /// address, and a port in 1..=65535.
    #[error("bad address in join string: {0}")]
    Address(&'static str),
}

const SCHEME: &str = "dtrain://";

impl fmt::Display for JoinTicket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCHEME}{}@{}/{}",
            hex::encode(self.secret),
            self.addr,
            hex::encode(self.fingerprint)
        )
    }
}

fn hex32(s: &str, what: &'static str) -> Result<[u8; 32], JoinError> {
    let v = hex::decode(s).map_err(|_| JoinError::Hex(what))?;
    v.try_into().map_err(|_| JoinError::Hex(what))
}

impl FromStr for JoinTicket {
    type Err = JoinError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s
            .trim()
            .strip_prefix(SCHEME)
            .ok_or(JoinError::Format("missing dtrain:// prefix"))?;
        let (secret, rest) = rest
            .split_once('@')
            .ok_or(JoinError::Format("missing '@'"))?;
        let (addr, fp) = rest
            .rsplit_once('/')
            .ok_or(JoinError::Format("missing '/' before the fingerprint"))?;
        if addr.is_empty() || !addr.contains(':') {
            return Err(JoinError::Format("address must be HOST:PORT"));
        }
        check_addr(addr)?;
        Ok(JoinTicket {
            addr: addr.to_string(),
            fingerprint: hex32(fp, "fingerprint")?,
            secret: hex32(secret, "secret")?,
        })
    }
}

/// Checks that `addr` is `HOST:PORT`: a host name, an IPv4 address or an IPv6 address in
/// brackets, and a port in 1..=65535. What passes may still fail to resolve, but nothing that
/// fails here could ever be reached.
fn check_addr(addr: &str) -> Result<(), JoinError> {
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or(JoinError::Format("address must be HOST:PORT"))?;
    match port.parse::<u16>() {
        Ok(p) if p > 0 && port.bytes().all(|b| b.is_ascii_digit()) => {}
        _ => return Err(JoinError::Address("the port must be a number in 1..=65535")),
    }
    if let Some(inner) = host.strip_prefix('[') {
        let ip = inner
            .strip_suffix(']')
            .ok_or(JoinError::Address("an IPv6 address needs its closing ']'"))?;
        ip.parse::<std::net::Ipv6Addr>()
            .map_err(|_| JoinError::Address("not an IPv6 address between '[' and ']'"))?;
        return Ok(());
    }
    if host.contains(':') {
        return Err(JoinError::Address(
            "an IPv6 address goes in brackets, as in [::1]:7070",
        ));
    }
    let name_ok = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|l| !l.is_empty() && l.len() <= 63)
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
    if !name_ok {
        return Err(JoinError::Address(
            "the host must be a host name, an IPv4 address or a bracketed IPv6 address",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let t = JoinTicket {
            addr: "127.0.0.1:7070".into(),
            fingerprint: [7; 32],
            secret: [9; 32],
        };
        let s = t.to_string();
        assert!(s.starts_with("dtrain://0909"));
        assert_eq!(s.parse::<JoinTicket>().unwrap(), t);
        let v6 = JoinTicket {
            addr: "[::1]:7070".into(),
            ..t
        };
        assert_eq!(v6.to_string().parse::<JoinTicket>().unwrap(), v6);
    }

    #[test]
    fn refuses_malformed() {
        assert!(matches!(
            "http://x".parse::<JoinTicket>(),
            Err(JoinError::Format(_))
        ));
        let good = JoinTicket {
            addr: "h:1".into(),
            fingerprint: [1; 32],
            secret: [2; 32],
        }
        .to_string();
        let short_fp = &good[..good.len() - 2];
        assert_eq!(
            short_fp.parse::<JoinTicket>(),
            Err(JoinError::Hex("fingerprint"))
        );
        let bad_secret = good.replacen("0202", "zz02", 1);
        assert_eq!(
            bad_secret.parse::<JoinTicket>(),
            Err(JoinError::Hex("secret"))
        );
        let no_port = good.replace("h:1", "h");
        assert!(matches!(
            no_port.parse::<JoinTicket>(),
            Err(JoinError::Format(_))
        ));
    }

    #[test]
    fn addresses_of_both_families_and_host_names_pass_and_malformed_ones_do_not() {
        let with = |addr: &str| {
            JoinTicket {
                addr: addr.into(),
                fingerprint: [1; 32],
                secret: [2; 32],
            }
            .to_string()
            .parse::<JoinTicket>()
        };
        for ok in [
            "127.0.0.1:7070",
            "[::1]:7070",
            "[2001:db8::1]:65535",
            "localhost:7070",
            "coord-1.example.org:7070",
        ] {
            assert_eq!(with(ok).map(|t| t.addr), Ok(ok.to_string()), "{ok}");
        }
        for bad in [
            "::1:7070",
            "[::1:7070",
            "[::g]:7070",
            "[]:7070",
            "127.0.0.1:0",
            "127.0.0.1:70000",
            "127.0.0.1:+80",
            "127.0.0.1:",
            ":7070",
            "host name:7070",
            "a..b:7070",
        ] {
            assert!(
                matches!(with(bad), Err(JoinError::Address(_))),
                "{bad}: {:?}",
                with(bad)
            );
        }
    }
}
