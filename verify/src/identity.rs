//! Persistent worker identities (ed25519) and signatures over commitments.

use std::fmt;
use std::io::Write;
use std::path::Path;

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::{Commitment, VerifyError};

/// A worker's public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct WorkerId(pub [u8; 32]);

impl WorkerId {
    /// The first 8 bytes in hex, for logs.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..8])
    }
}

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WorkerId({})", self.short())
    }
}

/// An ed25519 signature.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signature(#[serde(with = "serde_bytes")] pub [u8; 64]);

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({}…)", hex::encode(&self.0[..8]))
    }
}

/// A worker's secret key.
#[derive(Clone)]
pub struct WorkerKey {
    key: SigningKey,
}

const KEY_FILE_TAG: &str = "dtrain-worker-key-v1";

impl WorkerKey {
    /// A fresh random key.
    pub fn generate() -> Self {
        WorkerKey {
            key: SigningKey::generate(&mut rand::rngs::OsRng),
        }
    }

    /// A key from a 32-byte seed (tests, reproducible experiments).
    pub fn from_seed(seed: [u8; 32]) -> Self {
        WorkerKey {
            key: SigningKey::from_bytes(&seed),
        }
    }

    /// Loads the key at `path`, or creates one there (mode 0600, atomic write).
    pub fn load_or_create(path: &Path) -> Result<Self, VerifyError> {
        let bad = |reason: &str| VerifyError::KeyFile {
            path: path.display().to_string(),
            reason: reason.to_string(),
        };
        if path.exists() {
            let text = std::fs::read_to_string(path)?;
            let hexkey = text
                .trim()
                .strip_prefix(KEY_FILE_TAG)
                .map(str::trim)
                .ok_or_else(|| bad("not a dtrain worker key"))?;
            let bytes = hex::decode(hexkey).map_err(|_| bad("key is not hex"))?;
            let seed: [u8; 32] = bytes.try_into().map_err(|_| bad("key is not 32 bytes"))?;
            return Ok(Self::from_seed(seed));
        }
        let key = Self::generate();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension("tmp");
        {
            let mut opts = std::fs::OpenOptions::new();
            opts.write(true).create(true).truncate(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                opts.mode(0o600);
            }
            let mut f = opts.open(&tmp)?;
            writeln!(f, "{KEY_FILE_TAG} {}", hex::encode(key.key.to_bytes()))?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)?;
        Ok(key)
    }

    /// The public half.
    pub fn public(&self) -> WorkerId {
        WorkerId(self.key.verifying_key().to_bytes())
    }

    /// Signs the commitment's digest.
    pub fn sign(&self, c: &Commitment) -> Signature {
        Signature(self.key.sign(&c.digest()).to_bytes())
    }
}

/// Checks `sig` over `c.digest()` for the worker `id`.
pub fn verify_signature(id: &WorkerId, c: &Commitment, sig: &Signature) -> Result<(), VerifyError> {
    let vk = VerifyingKey::from_bytes(&id.0).map_err(|_| VerifyError::BadKey)?;
    let sig = ed25519_dalek::Signature::from_bytes(&sig.0);
    vk.verify_strict(&c.digest(), &sig)
        .map_err(|_| VerifyError::BadSignature)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commit::tests::sample;

    #[test]
    fn sign_and_verify() {
        let k = WorkerKey::from_seed([3; 32]);
        let c = sample();
        let s = k.sign(&c);
        verify_signature(&k.public(), &c, &s).unwrap();
        let other = WorkerKey::from_seed([4; 32]);
        assert!(verify_signature(&other.public(), &c, &s).is_err());
        let tampered = Commitment {
            seed: 99,
            ..sample()
        };
        assert!(verify_signature(&k.public(), &tampered, &s).is_err());
        let mut bad = s;
        bad.0[5] ^= 1;
        assert!(verify_signature(&k.public(), &c, &bad).is_err());
    }

    #[test]
    fn key_file_persists_and_rejects_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/worker.key");
        let a = WorkerKey::load_or_create(&p).unwrap();
        let b = WorkerKey::load_or_create(&p).unwrap();
        assert_eq!(a.public(), b.public());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&p).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::write(&p, "garbage").unwrap();
        assert!(matches!(
            WorkerKey::load_or_create(&p),
            Err(VerifyError::KeyFile { .. })
        ));
        std::fs::write(&p, format!("{KEY_FILE_TAG} abcd")).unwrap();
        assert!(WorkerKey::load_or_create(&p).is_err());
    }
}
