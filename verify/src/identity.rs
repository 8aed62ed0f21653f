//! Persistent worker identities (ed25519) and signatures over commitments.

use std::fmt;
use std::io::Write;
use std::path::Path;

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::{Commitment, VerifyError};

/// A worker's ed25519 public key: its identity everywhere in the swarm.
///
/// `Display` prints all 32 bytes in hex (and `FromStr` parses that back); [`WorkerId::short`]
/// gives the first 8 bytes for logs.
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

impl std::str::FromStr for WorkerId {
    type Err = VerifyError;

    /// Parses 64 hex digits (the `Display` form). Does not check that the key is a valid
    /// curve point; [`verify_signature`] does.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut id = [0u8; 32];
        hex::decode_to_slice(s.trim(), &mut id).map_err(|_| VerifyError::BadKey)?;
        Ok(WorkerId(id))
    }
}

impl fmt::Debug for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WorkerId({})", self.short())
    }
}

/// An ed25519 signature (64 bytes), serialized as a byte string.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signature(#[serde(with = "serde_bytes")] pub [u8; 64]);

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({}…)", hex::encode(&self.0[..8]))
    }
}

/// A worker's persistent ed25519 secret key. `Debug` shows only the public half.
#[derive(Clone)]
pub struct WorkerKey {
    key: SigningKey,
}

impl fmt::Debug for WorkerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WorkerKey({})", self.public().short())
    }
}

/// First token of a key file; the second is the 32-byte secret seed in hex.
const KEY_FILE_TAG: &str = "dtrain-worker-key-v1";

impl WorkerKey {
    /// A fresh random key from the operating system's generator.
    pub fn generate() -> Self {
        WorkerKey {
            key: SigningKey::generate(&mut rand::rngs::OsRng),
        }
    }

    /// A key from a 32-byte secret seed (tests, reproducible experiments).
    pub fn from_seed(seed: [u8; 32]) -> Self {
        WorkerKey {
            key: SigningKey::from_bytes(&seed),
        }
    }

    /// Loads the key at `path`, or creates one there if the file does not exist.
    ///
    /// The file is one line, `dtrain-worker-key-v1 <64 hex digits>`. A new file is written
    /// atomically (unique temporary file in the same directory, mode 0600 on unix, fsync,
    /// then linked into place) so a crash never leaves a truncated key behind, and two
    /// processes racing to create the same key end up sharing one. A file that exists but
    /// is not a valid key is an error ([`VerifyError::KeyFile`]), never silently replaced.
    pub fn load_or_create(path: &Path) -> Result<Self, VerifyError> {
        match std::fs::read(path) {
            Ok(bytes) => return Self::parse_key_file(path, &bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        let key = Self::generate();
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        std::fs::create_dir_all(dir)?;
        let name = path.file_name().ok_or_else(|| VerifyError::KeyFile {
            path: path.display().to_string(),
            reason: "not a file name".into(),
        })?;
        let tmp = dir.join(format!(
            ".{}.tmp-{}-{:016x}",
            name.to_string_lossy(),
            std::process::id(),
            rand::random::<u64>()
        ));
        let written = Self::write_new(&tmp, &key).and_then(|()| {
            // A hard link fails if `path` appeared meanwhile (another process won the
            // race); fall back to rename where the file system has no hard links.
            match std::fs::hard_link(&tmp, path) {
                Ok(()) => std::fs::remove_file(&tmp).map(|()| true),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
                Err(_) => std::fs::rename(&tmp, path).map(|()| true),
            }
        });
        let _ = std::fs::remove_file(&tmp); // Already gone on success.
        if !written? {
            let bytes = std::fs::read(path)?;
            return Self::parse_key_file(path, &bytes);
        }
        #[cfg(unix)]
        std::fs::File::open(dir)?.sync_all()?;
        Ok(key)
    }

    fn write_new(tmp: &Path, key: &WorkerKey) -> std::io::Result<()> {
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts.open(tmp)?;
        writeln!(f, "{KEY_FILE_TAG} {}", hex::encode(key.key.to_bytes()))?;
        f.sync_all()
    }

    fn parse_key_file(path: &Path, bytes: &[u8]) -> Result<Self, VerifyError> {
        let bad = |reason: &str| VerifyError::KeyFile {
            path: path.display().to_string(),
            reason: reason.to_string(),
        };
        let text = std::str::from_utf8(bytes).map_err(|_| bad("not text"))?;
        let hexkey = text
            .trim()
            .strip_prefix(KEY_FILE_TAG)
            .map(str::trim)
            .ok_or_else(|| bad("not a dtrain worker key"))?;
        let mut seed = [0u8; 32];
        hex::decode_to_slice(hexkey, &mut seed).map_err(|_| bad("key is not 64 hex digits"))?;
        Ok(Self::from_seed(seed))
    }

    /// The public half: the worker's [`WorkerId`].
    pub fn public(&self) -> WorkerId {
        WorkerId(self.key.verifying_key().to_bytes())
    }

    /// Signs [`Commitment::digest`].
    pub fn sign(&self, c: &Commitment) -> Signature {
        Signature(self.key.sign(&c.digest()).to_bytes())
    }
}

/// Checks `sig` over `c.digest()` for the worker `id`.
///
/// Uses ed25519 strict verification (rejects small-order keys and non-canonical
/// signatures, so a signature cannot be mauled into another valid one). Errors with
/// [`VerifyError::BadKey`] when `id` is not a valid public key and
/// [`VerifyError::BadSignature`] when the signature does not verify.
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
    fn ids_print_and_parse() {
        let id = WorkerKey::from_seed([3; 32]).public();
        assert_eq!(id.to_string().len(), 64);
        assert!(id.to_string().starts_with(&id.short()));
        assert_eq!(id.short().len(), 16);
        assert_eq!(id.to_string().parse::<WorkerId>().unwrap(), id);
        assert!("abcd".parse::<WorkerId>().is_err());
        assert!(format!("{:?}", WorkerKey::from_seed([3; 32])).contains(&id.short()));
        assert!(!format!("{:?}", WorkerKey::from_seed([3; 32])).contains(&hex::encode([3u8; 32])));
    }

    #[test]
    fn invalid_public_key_is_bad_key() {
        let c = sample();
        let s = WorkerKey::from_seed([3; 32]).sign(&c);
        // y = 2 is not on the curve.
        let mut not_a_point = [0u8; 32];
        not_a_point[0] = 2;
        assert!(matches!(
            verify_signature(&WorkerId(not_a_point), &c, &s),
            Err(VerifyError::BadKey)
        ));
        // The identity point is a weak key that strict verification refuses.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        assert!(verify_signature(&WorkerId(identity), &c, &Signature([0; 64])).is_err());
    }

    #[test]
    fn signatures_round_trip_through_serde() {
        let s = WorkerKey::from_seed([3; 32]).sign(&sample());
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<Signature>(&json).unwrap(), s);
        let id = WorkerKey::from_seed([3; 32]).public();
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(serde_json::from_str::<WorkerId>(&json).unwrap(), id);
    }

    #[test]
    fn key_file_persists_and_rejects_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/worker.key");
        let a = WorkerKey::load_or_create(&p).unwrap();
        let b = WorkerKey::load_or_create(&p).unwrap();
        assert_eq!(a.public(), b.public());
        let c = sample();
        verify_signature(&a.public(), &c, &b.sign(&c)).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&p).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // No temporary files left behind.
        let names: Vec<_> = std::fs::read_dir(p.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("worker.key")]);

        let corrupt: [&[u8]; 5] = [
            b"garbage",
            b"dtrain-worker-key-v1 abcd",
            b"dtrain-worker-key-v1 zz00000000000000000000000000000000000000000000000000000000000000",
            b"other-tag 0000000000000000000000000000000000000000000000000000000000000000",
            &[0xff, 0xfe, 0x00, 0x80],
        ];
        for bytes in corrupt {
            std::fs::write(&p, bytes).unwrap();
            assert!(matches!(
                WorkerKey::load_or_create(&p),
                Err(VerifyError::KeyFile { .. })
            ));
            // A corrupted key is reported, never replaced.
            assert_eq!(std::fs::read(&p).unwrap(), bytes);
        }
    }

    #[test]
    fn racing_creators_share_one_key() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("worker.key");
        let ids: Vec<WorkerId> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| s.spawn(|| WorkerKey::load_or_create(&p).unwrap().public()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let on_disk = WorkerKey::load_or_create(&p).unwrap().public();
        assert!(ids.iter().all(|id| *id == on_disk), "{ids:?}");
    }
}
