//! The worker's data cache: files named by their BLAKE3 hash (`blobs/<hex>`), written
//! atomically (a `.part` file renamed into place once every byte is verified), reused by
//! every run that shares a file, and kept under a size cap by evicting the least recently
//! used files. One lock file serializes the workers of one machine that share the folder,
//! so a file is downloaded once.

use std::collections::HashSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use proto::DataFile;

/// Errors of the cache folder; each names the path and what to do.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The folder cannot be created or written.
    #[error("the data cache {path} is not usable ({error}); pick another with --cache-dir")]
    Unusable {
        /// The folder or file.
        path: String,
        /// The cause (in the message, so not also a `source` of the error chain).
        error: std::io::Error,
    },
    /// The run's data does not fit the size cap.
    #[error(
        "the run's data needs {need} bytes in the cache, more than --cache-max-gb allows \
         ({cap} bytes); raise it or free the cache"
    )]
    TooSmall {
        /// Bytes the run needs.
        need: u64,
        /// The cap.
        cap: u64,
    },
}

/// A cache folder with a size cap.
pub struct Cache {
    dir: PathBuf,
    max_bytes: u64,
}

/// The exclusive lock on a cache folder, released when dropped.
pub struct CacheLock(File);

impl Drop for CacheLock {
    fn drop(&mut self) {
        let _ = self.0.unlock();
    }
}

/// The error of an I/O failure on `path` in the cache (or a folder the worker writes).
pub(crate) fn unusable(path: &Path) -> impl FnOnce(std::io::Error) -> CacheError + '_ {
    move |source| CacheError::Unusable {
        path: path.display().to_string(),
        error: source,
    }
}

impl Cache {
    /// Opens (creating) the folder `dir`, checking that it can be written.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Self, CacheError> {
        let dir = &std::path::absolute(dir).map_err(unusable(dir))?;
        for sub in ["blobs", "tmp"] {
            let d = dir.join(sub);
            std::fs::create_dir_all(&d).map_err(unusable(&d))?;
        }
        let probe = dir
            .join("tmp")
            .join(format!("probe-{}", std::process::id()));
        std::fs::write(&probe, b"dtrain").map_err(unusable(&probe))?;
        let _ = std::fs::remove_file(&probe);
        Ok(Cache {
            dir: dir.to_path_buf(),
            max_bytes,
        })
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Takes the folder's lock without waiting; `None` while another worker holds it.
    pub fn try_lock(&self) -> Result<Option<CacheLock>, CacheError> {
        let path = self.dir.join("lock");
        let f = File::create(&path).map_err(unusable(&path))?;
        match f.try_lock() {
            Ok(()) => Ok(Some(CacheLock(f))),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => Err(unusable(&path)(e)),
        }
    }

    /// Where the file of `hash` lives.
    pub fn path(&self, hash: &[u8; 32]) -> PathBuf {
        self.dir.join("blobs").join(hex::encode(hash))
    }

    /// The temporary file for downloading `hash`, `len` bytes long, and whether it is an
    /// unfinished earlier download (kept while the run needs the file; whoever downloads
    /// holds the cache's lock, so there is one writer).
    pub fn part(&self, hash: &[u8; 32], len: u64) -> Result<(PathBuf, File, bool), CacheError> {
        let path = self
            .dir
            .join("tmp")
            .join(format!("{}.part", hex::encode(hash)));
        let resumed = std::fs::metadata(&path).is_ok_and(|m| m.len() == len);
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(unusable(&path))?;
        if !resumed {
            f.set_len(0).map_err(unusable(&path))?;
            f.set_len(len).map_err(unusable(&path))?;
        }
        Ok((path, f, resumed))
    }

    /// Moves a finished, verified temporary file into place.
    pub fn insert(&self, hash: &[u8; 32], part: &Path, file: File) -> Result<PathBuf, CacheError> {
        file.sync_all().map_err(unusable(part))?;
        let to = self.path(hash);
        std::fs::rename(part, &to).map_err(unusable(&to))?;
        Ok(to)
    }

    /// Whether the cache holds `f` intact (length and BLAKE3 checked; a damaged copy is
    /// removed). Marks it as just used.
    pub fn holds(&self, f: &DataFile) -> bool {
        let path = self.path(&f.blake3);
        match std::fs::metadata(&path) {
            Ok(m) if m.len() == f.len => {}
            Ok(_) => {
                let _ = std::fs::remove_file(&path);
                return false;
            }
            Err(_) => return false,
        }
        if file_hash(&path).as_ref() != Some(&f.blake3) {
            tracing::warn!("{} in the cache is damaged; fetching it again", f.name);
            let _ = std::fs::remove_file(&path);
            return false;
        }
        if let Ok(file) = File::options().write(true).open(&path) {
            let _ = file.set_modified(SystemTime::now());
        }
        true
    }

    /// Errors unless `need` bytes fit under the cap.
    pub fn check_fits(&self, need: u64) -> Result<(), CacheError> {
        if need > self.max_bytes {
            return Err(CacheError::TooSmall {
                need,
                cap: self.max_bytes,
            });
        }
        Ok(())
    }

    /// Removes the least recently used files other than `keep` until the cache holds at most
    /// its cap; returns the bytes removed. Leftover temporary files of dead downloads go too.
    pub fn evict(&self, keep: &HashSet<[u8; 32]>) -> Result<u64, CacheError> {
        let blobs = self.dir.join("blobs");
        let mut files: Vec<(SystemTime, u64, PathBuf)> = Vec::new();
        let mut total = 0u64;
        for e in std::fs::read_dir(&blobs).map_err(unusable(&blobs))? {
            let e = e.map_err(unusable(&blobs))?;
            let Ok(m) = e.metadata() else { continue };
            total += m.len();
            let name = e.file_name().to_string_lossy().to_string();
            let kept = hex::decode(&name)
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .is_some_and(|h| keep.contains(&h));
            if !kept {
                let used = m.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                files.push((used, m.len(), e.path()));
            }
        }
        files.sort();
        let mut removed = 0;
        for (_, len, path) in files {
            if total <= self.max_bytes {
                break;
            }
            std::fs::remove_file(&path).map_err(unusable(&path))?;
            tracing::info!("cache: evicted {} ({len} bytes)", path.display());
            total -= len;
            removed += len;
        }
        // Unfinished downloads of other files go too; the run's own are resumed later.
        let tmp = self.dir.join("tmp");
        for e in std::fs::read_dir(&tmp).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let ours = name
                .strip_suffix(".part")
                .and_then(|h| hex::decode(h).ok())
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .is_some_and(|h| keep.contains(&h));
            if !ours {
                let _ = std::fs::remove_file(e.path());
            }
        }
        Ok(removed)
    }

    /// Bytes held in `blobs/`.
    pub fn size(&self) -> u64 {
        std::fs::read_dir(self.dir.join("blobs"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum()
    }
}

/// BLAKE3 of a file's bytes, read in pieces (`None` when it cannot be read).
pub fn file_hash(path: &Path) -> Option<[u8; 32]> {
    let mut h = blake3::Hasher::new();
    h.update_reader(File::open(path).ok()?).ok()?;
    Some(*h.finalize().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(c: &Cache, bytes: &[u8]) -> DataFile {
        let hash = *blake3::hash(bytes).as_bytes();
        let (p, f, _) = c.part(&hash, bytes.len() as u64).unwrap();
        std::fs::write(&p, bytes).unwrap();
        c.insert(&hash, &p, f).unwrap();
        DataFile {
            name: "x".into(),
            len: bytes.len() as u64,
            blake3: hash,
        }
    }

    fn age(c: &Cache, f: &DataFile, secs: u64) {
        let t = SystemTime::now() - std::time::Duration::from_secs(secs);
        let file = File::options().write(true).open(c.path(&f.blake3)).unwrap();
        file.set_modified(t).unwrap();
    }

    #[test]
    fn the_cap_evicts_the_least_recently_used_and_keeps_the_run_s_files() {
        let d = tempfile::tempdir().unwrap();
        let c = Cache::open(d.path(), 2500).unwrap();
        let a = put(&c, &[1u8; 1000]);
        let b = put(&c, &[2u8; 1000]);
        let x = put(&c, &[3u8; 1000]);
        age(&c, &a, 300);
        age(&c, &b, 200);
        age(&c, &x, 100);
        // `a` is the oldest but in use by the run: `b` goes instead.
        let keep: HashSet<_> = [a.blake3].into();
        assert_eq!(c.evict(&keep).unwrap(), 1000);
        assert!(c.holds(&a) && !c.holds(&b) && c.holds(&x));
        assert!(c.size() <= 2500);
        // `holds` refreshed `a` and `x`; a newer file pushes out the older of them.
        age(&c, &x, 50);
        let y = put(&c, &[4u8; 1000]);
        assert_eq!(c.evict(&[y.blake3].into()).unwrap(), 1000);
        assert!(c.holds(&a) && !c.holds(&x) && c.holds(&y));
        assert!(c.size() <= 2500);
    }

    #[test]
    fn a_damaged_or_truncated_copy_is_not_held() {
        let d = tempfile::tempdir().unwrap();
        let c = Cache::open(d.path(), 1 << 20).unwrap();
        let f = put(&c, b"hello data");
        assert!(c.holds(&f));
        std::fs::write(c.path(&f.blake3), b"hello dat!").unwrap();
        assert!(!c.holds(&f));
        assert!(!c.path(&f.blake3).exists());
        let g = put(&c, b"more data");
        std::fs::write(c.path(&g.blake3), b"more").unwrap();
        assert!(!c.holds(&g));
    }

    #[test]
    fn an_unwritable_folder_is_a_clear_error() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("plain-file");
        std::fs::write(&file, b"").unwrap();
        let e = Cache::open(&file.join("cache"), 1)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("--cache-dir") && e.contains("plain-file"), "{e}");
        let c = Cache::open(d.path(), 10).unwrap();
        let e = c.check_fits(11).unwrap_err().to_string();
        assert!(e.contains("--cache-max-gb"), "{e}");
    }

    #[test]
    fn the_lock_is_exclusive() {
        let d = tempfile::tempdir().unwrap();
        let c = Cache::open(d.path(), 10).unwrap();
        let held = c.try_lock().unwrap();
        assert!(held.is_some());
        assert!(c.try_lock().unwrap().is_none());
        drop(held);
        assert!(c.try_lock().unwrap().is_some());
    }
}
