//! The run's identity file (TLS certificate, join secret, run id, port) in the output
//! directory, and the atomic write (temp file, fsync, rename, fsync of the directory) every
//! file of the coordinator goes through.

use std::fs::OpenOptions;
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// Writes `bytes` to `path` atomically and durably.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomically(path, bytes, false)
}

/// [`atomic_write`] of a file only its owner may read (0600 from its creation, on Unix).
fn atomic_write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomically(path, bytes, true)
}

fn write_atomically(path: &Path, bytes: &[u8], private: bool) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension("tmp");
    {
        let mut opts = OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        if private {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        #[cfg(not(unix))]
        let _ = private;
        let mut f = opts
            .open(&tmp)
            .with_context(|| format!("create {}", tmp.display()))?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("rename to {}", path.display()))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// The address to listen on: the configured one, except that a resumed run configured with
/// port 0 keeps the port it had before (`recorded`), the one its workers' join string names.
pub fn listen_addr(configured: SocketAddr, resume: bool, recorded: Option<u16>) -> SocketAddr {
    match recorded {
        Some(port) if resume && configured.port() == 0 && port != 0 => {
            SocketAddr::new(configured.ip(), port)
        }
        _ => configured,
    }
}

/// The run's persistent identity.
#[derive(Clone)]
pub struct RunIdentity {
    /// TLS certificate and key.
    pub tls: proto::tls::Identity,
    /// Join secret.
    pub secret: [u8; 32],
    /// Run id.
    pub run_id: [u8; 32],
    /// The UDP port the run last listened on (None until the first start has bound one).
    pub port: Option<u16>,
}

#[derive(Serialize, Deserialize)]
struct IdentityFile {
    cert_der: String,
    key_der: String,
    secret: String,
    run_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    port: Option<u16>,
}

fn hex32(s: &str) -> Result<[u8; 32]> {
    let v = hex::decode(s)?;
    v.try_into()
        .map_err(|_| anyhow::anyhow!("expected 32 bytes"))
}

impl RunIdentity {
    /// Loads `dir/identity.json`, or creates a fresh identity there.
    pub fn load_or_create(dir: &Path) -> Result<Self> {
        use rand::RngCore;
        let path = dir.join("identity.json");
        if path.exists() {
            let f: IdentityFile = serde_json::from_slice(&std::fs::read(&path)?)
                .with_context(|| format!("{} is corrupt", path.display()))?;
            return Ok(RunIdentity {
                tls: proto::tls::Identity {
                    cert_der: hex::decode(f.cert_der)?,
                    key_der: hex::decode(f.key_der)?,
                },
                secret: hex32(&f.secret)?,
                run_id: hex32(&f.run_id)?,
                port: f.port,
            });
        }
        let mut rng = rand::rngs::OsRng;
        let mut secret = [0u8; 32];
        let mut run_id = [0u8; 32];
        rng.fill_bytes(&mut secret);
        rng.fill_bytes(&mut run_id);
        let id = RunIdentity {
            tls: proto::tls::Identity::generate()?,
            secret,
            run_id,
            port: None,
        };
        id.save(dir)?;
        Ok(id)
    }

    /// Records the port the run listens on (kept for restarts with port 0).
    pub fn record_port(&mut self, dir: &Path, port: u16) -> Result<()> {
        self.port = Some(port);
        self.save(dir)
    }

    fn save(&self, dir: &Path) -> Result<()> {
        let f = IdentityFile {
            cert_der: hex::encode(&self.tls.cert_der),
            key_der: hex::encode(&self.tls.key_der),
            secret: hex::encode(self.secret),
            run_id: hex::encode(self.run_id),
            port: self.port,
        };
        atomic_write_private(&dir.join("identity.json"), &serde_json::to_vec_pretty(&f)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_persists() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = RunIdentity::load_or_create(dir.path()).unwrap();
        assert_eq!(a.port, None);
        a.record_port(dir.path(), 7311).unwrap();
        let b = RunIdentity::load_or_create(dir.path()).unwrap();
        assert_eq!(a.secret, b.secret);
        assert_eq!(a.tls.fingerprint(), b.tls.fingerprint());
        assert_eq!(b.port, Some(7311));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let meta = std::fs::metadata(dir.path().join("identity.json")).unwrap();
            assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        }
    }

    #[test]
    fn a_resumed_run_on_port_0_keeps_its_port() {
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let fixed: SocketAddr = "127.0.0.1:7070".parse().unwrap();
        let v6: SocketAddr = "[::1]:0".parse().unwrap();
        assert_eq!(
            listen_addr(any, true, Some(7311)).to_string(),
            "127.0.0.1:7311"
        );
        assert_eq!(listen_addr(v6, true, Some(7311)).to_string(), "[::1]:7311");
        // A fresh run, a first start, or a port set in the config: as configured.
        assert_eq!(listen_addr(any, false, Some(7311)), any);
        assert_eq!(listen_addr(any, true, None), any);
        assert_eq!(listen_addr(fixed, true, Some(7311)), fixed);
    }
}
