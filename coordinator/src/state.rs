//! The run's identity file (TLS certificate, join secret, run id) in the output directory,
//! and the atomic write (temp file, fsync, rename, fsync of the directory) every file of the
//! coordinator goes through.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// Writes `bytes` to `path` atomically and durably.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension("tmp");
    {
        let mut f =
            std::fs::File::create(&tmp).with_context(|| format!("create {}", tmp.display()))?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("rename to {}", path.display()))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
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
}

#[derive(Serialize, Deserialize)]
struct IdentityFile {
    cert_der: String,
    key_der: String,
    secret: String,
    run_id: String,
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
        };
        let f = IdentityFile {
            cert_der: hex::encode(&id.tls.cert_der),
            key_der: hex::encode(&id.tls.key_der),
            secret: hex::encode(id.secret),
            run_id: hex::encode(id.run_id),
        };
        atomic_write(&path, &serde_json::to_vec_pretty(&f)?)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        }
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_persists() {
        let dir = tempfile::tempdir().unwrap();
        let a = RunIdentity::load_or_create(dir.path()).unwrap();
        let b = RunIdentity::load_or_create(dir.path()).unwrap();
        assert_eq!(a.secret, b.secret);
        assert_eq!(a.tls.fingerprint(), b.tls.fingerprint());
    }
}
