//! Files the coordinator keeps in its output directory: its identity (TLS certificate,
//! join secret, run id) and checkpoints. Every write is atomic: temp file, fsync, rename,
//! fsync of the directory.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use trainer::Optimizer;

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

/// Everything needed to continue a run where it stopped.
#[derive(Clone, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Format version.
    pub version: u32,
    /// The run it belongs to.
    pub run_id: [u8; 32],
    /// Steps completed.
    pub step: u64,
    /// Parameters after `step` steps.
    pub params: Vec<f32>,
    /// Optimizer state.
    pub optimizer: Optimizer,
    /// Application bytes received so far.
    pub bytes_in: u64,
    /// Application bytes sent so far.
    pub bytes_out: u64,
    /// Wall seconds spent before this checkpoint.
    pub wall_s: f64,
    /// Distinct workers seen.
    pub workers_seen: u64,
}

const CHECKPOINT_VERSION: u32 = 1;

/// Path of the checkpoint in an output directory.
pub fn checkpoint_path(dir: &Path) -> PathBuf {
    dir.join("checkpoint.bin")
}

impl Checkpoint {
    /// Saves the checkpoint atomically; the blake3 of the body is appended for integrity.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let mut body = bincode::serialize(&(CHECKPOINT_VERSION, self))?;
        let sum = blake3::hash(&body);
        body.extend_from_slice(sum.as_bytes());
        atomic_write(&checkpoint_path(dir), &body)
    }

    /// Loads the checkpoint of `dir`, if any, checking its integrity and run id.
    pub fn load(dir: &Path, run_id: &[u8; 32], n_params: usize) -> Result<Option<Self>> {
        let path = checkpoint_path(dir);
        if !path.exists() {
            return Ok(None);
        }
        let bytes = std::fs::read(&path)?;
        if bytes.len() < 32 {
            bail!("{} is truncated", path.display());
        }
        let (body, sum) = bytes.split_at(bytes.len() - 32);
        if blake3::hash(body).as_bytes() != sum {
            bail!("{} fails its checksum", path.display());
        }
        let (version, ck): (u32, Checkpoint) = bincode::deserialize(body)?;
        if version != CHECKPOINT_VERSION || ck.version != CHECKPOINT_VERSION {
            bail!(
                "{}: unsupported checkpoint version {version}",
                path.display()
            );
        }
        if &ck.run_id != run_id {
            bail!("{} belongs to another run", path.display());
        }
        if ck.params.len() != n_params {
            bail!(
                "{}: {} parameters, the model has {n_params}",
                path.display(),
                ck.params.len()
            );
        }
        Ok(Some(ck))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trainer::OptimizerConfig;

    #[test]
    fn identity_persists() {
        let dir = tempfile::tempdir().unwrap();
        let a = RunIdentity::load_or_create(dir.path()).unwrap();
        let b = RunIdentity::load_or_create(dir.path()).unwrap();
        assert_eq!(a.secret, b.secret);
        assert_eq!(a.tls.fingerprint(), b.tls.fingerprint());
    }

    #[test]
    fn checkpoint_round_trip_and_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let ck = Checkpoint {
            version: CHECKPOINT_VERSION,
            run_id: [1; 32],
            step: 7,
            params: vec![1.0, 2.0],
            optimizer: Optimizer::new(OptimizerConfig::default()),
            bytes_in: 3,
            bytes_out: 4,
            wall_s: 1.5,
            workers_seen: 2,
        };
        ck.save(dir.path()).unwrap();
        let back = Checkpoint::load(dir.path(), &[1; 32], 2).unwrap().unwrap();
        assert_eq!(back.step, 7);
        assert_eq!(back.params, vec![1.0, 2.0]);
        assert!(Checkpoint::load(dir.path(), &[2; 32], 2).is_err());
        assert!(Checkpoint::load(dir.path(), &[1; 32], 3).is_err());
        let p = checkpoint_path(dir.path());
        let mut bytes = std::fs::read(&p).unwrap();
        bytes[10] ^= 1;
        std::fs::write(&p, bytes).unwrap();
        assert!(Checkpoint::load(dir.path(), &[1; 32], 2).is_err());
    }
}
