//! The output directory's own files: its lock (one coordinator per folder), the run's
//! identity (TLS certificate, join secret, run id, port), and the atomic write (temp file,
//! fsync, rename, fsync of the directory) every file of the coordinator goes through.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

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

/// Name of the lock file in an output directory.
pub const LOCK_FILE: &str = "coordinator.lock";

/// Why the output directory could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another coordinator holds the lock.
    #[error(
        "{dir} is in use by another coordinator (pid {}); stop it first, or give this run another run.output_dir",
        pid.map_or_else(|| "unknown".to_string(), |p| p.to_string())
    )]
    Busy {
        /// The output directory.
        dir: PathBuf,
        /// The process holding it, as it wrote into the lock file.
        pid: Option<u32>,
    },
    /// The lock file could not be opened, written or locked.
    #[error("cannot lock {path}: {error}")]
    Io {
        /// The lock file.
        path: PathBuf,
        /// What failed (in the message, so not also a `source` of the error chain).
        error: std::io::Error,
    },
}

/// The lock on an output directory, held while this value lives: an advisory, exclusive
/// lock (`flock`) on `coordinator.lock`, which names the holder's pid. The OS releases it
/// when the process ends in any way, so a `kill -9` leaves no stale lock behind.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

impl DirLock {
    /// Locks `dir` (which must exist), or says which process holds it.
    pub fn acquire(dir: &Path) -> Result<Self, LockError> {
        let path = dir.join(LOCK_FILE);
        let io = |source| LockError::Io {
            path: path.clone(),
            error: source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                return Err(LockError::Busy {
                    dir: dir.to_path_buf(),
                    pid: text.trim().parse().ok(),
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
        }
        file.set_len(0)
            .and_then(|_| file.write_all(format!("{}\n", std::process::id()).as_bytes()))
            .and_then(|_| file.sync_data())
            .map_err(io)?;
        Ok(DirLock { _file: file })
    }
}

/// The address to reach, from this machine, a server listening on `listen`: loopback of the
/// same family in place of an unspecified address (`0.0.0.0`, `[::]`).
pub fn local_addr(listen: SocketAddr) -> SocketAddr {
    let mut a = listen;
    if a.ip().is_unspecified() {
        a.set_ip(match a {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    a
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
    /// The operator's bearer token for the status server's actions (pause, resume, stop,
    /// ban); unrelated to the join secret, which workers hold.
    pub monitor_token: [u8; 32],
}

#[derive(Serialize, Deserialize)]
struct IdentityFile {
    cert_der: String,
    key_der: String,
    secret: String,
    run_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    port: Option<u16>,
    /// Absent in identities written before the status server existed: one is added.
    #[serde(default)]
    monitor_token: Option<String>,
}

fn hex32(s: &str) -> Result<[u8; 32]> {
    let v = hex::decode(s)?;
    v.try_into()
        .map_err(|_| anyhow::anyhow!("expected 32 bytes"))
}

/// 32 bytes from the operating system's generator.
fn random32() -> [u8; 32] {
    use rand::RngCore;
    let mut b = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut b);
    b
}

/// The operator token of the run in `dir` (its `identity.json`), for `coordinator status`
/// and scripts; `None` when the run has no identity yet or an old one without a token.
pub fn read_monitor_token(dir: &Path) -> Result<Option<String>> {
    let path = dir.join("identity.json");
    if !path.exists() {
        return Ok(None);
    }
    let f: IdentityFile = serde_json::from_slice(&std::fs::read(&path)?)
        .with_context(|| format!("{} is corrupt", path.display()))?;
    Ok(f.monitor_token)
}

impl RunIdentity {
    /// Loads `dir/identity.json`, or creates a fresh identity there.
    pub fn load_or_create(dir: &Path) -> Result<Self> {
        let path = dir.join("identity.json");
        if path.exists() {
            let f: IdentityFile = serde_json::from_slice(&std::fs::read(&path)?)
                .with_context(|| format!("{} is corrupt", path.display()))?;
            let id = RunIdentity {
                tls: proto::tls::Identity {
                    cert_der: hex::decode(f.cert_der)?,
                    key_der: hex::decode(f.key_der)?,
                },
                secret: hex32(&f.secret)?,
                run_id: hex32(&f.run_id)?,
                port: f.port,
                monitor_token: match &f.monitor_token {
                    Some(t) => hex32(t).with_context(|| {
                        format!("{}: monitor_token is not 32 hex bytes", path.display())
                    })?,
                    None => random32(),
                },
            };
            if f.monitor_token.is_none() {
                id.save(dir)?;
            }
            return Ok(id);
        }
        let id = RunIdentity {
            tls: proto::tls::Identity::generate()?,
            secret: random32(),
            run_id: random32(),
            port: None,
            monitor_token: random32(),
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
            monitor_token: Some(hex::encode(self.monitor_token)),
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

    #[test]
    fn a_second_lock_on_a_folder_is_refused_until_the_first_is_released() {
        let dir = tempfile::tempdir().unwrap();
        let first = DirLock::acquire(dir.path()).unwrap();
        let err = DirLock::acquire(dir.path()).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, LockError::Busy { pid: Some(p), .. } if p == std::process::id()),
            "{msg}"
        );
        assert!(msg.contains(&dir.path().display().to_string()), "{msg}");
        assert!(
            msg.contains(&format!("pid {}", std::process::id())),
            "{msg}"
        );
        drop(first);
        DirLock::acquire(dir.path()).unwrap();
    }
}
