//! The write-ahead log: length-prefixed, checksummed bincode entries, appended and synced
//! before anything that depends on them is reported. A torn tail (a crash in the middle of an
//! append) is detected by its length or checksum and cut off on opening.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{de::DeserializeOwned, Serialize};
use tracing::warn;

/// Largest entry accepted when reading the log back.
const MAX_ENTRY: u64 = 4 << 30;

/// An open log.
pub struct Wal {
    path: PathBuf,
    file: File,
    len: u64,
}

fn checksum(body: &[u8]) -> [u8; 8] {
    let mut c = [0u8; 8];
    c.copy_from_slice(&blake3::hash(body).as_bytes()[..8]);
    c
}

impl Wal {
    /// Opens (creating) the log at `path` and reads back every intact entry; a damaged tail
    /// is truncated.
    pub fn open<T: DeserializeOwned>(path: &Path) -> Result<(Self, Vec<T>)> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .with_context(|| format!("open {}", path.display()))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let mut entries = Vec::new();
        let mut at = 0usize;
        while let Some(len_bytes) = bytes.get(at..at + 4) {
            let len = u32::from_le_bytes([len_bytes[0], len_bytes[1], len_bytes[2], len_bytes[3]]);
            let end = at + 4 + len as usize + 8;
            if u64::from(len) > MAX_ENTRY || end > bytes.len() {
                break;
            }
            let body = &bytes[at + 4..at + 4 + len as usize];
            if bytes[end - 8..end] != checksum(body) {
                break;
            }
            match bincode::deserialize(body) {
                Ok(e) => entries.push(e),
                Err(_) => break,
            }
            at = end;
        }
        if at < bytes.len() {
            warn!(
                path = %path.display(),
                kept = at,
                dropped = bytes.len() - at,
                "write-ahead log has a damaged tail (interrupted write); cutting it off"
            );
            file.set_len(at as u64)?;
            file.sync_all()?;
        }
        file.seek(SeekFrom::End(0))?;
        Ok((
            Wal {
                path: path.to_path_buf(),
                file,
                len: at as u64,
            },
            entries,
        ))
    }

    /// Appends one entry and syncs it to disk.
    pub fn append<T: Serialize>(&mut self, entry: &T) -> Result<()> {
        let body = bincode::serialize(entry)?;
        let mut buf = Vec::with_capacity(body.len() + 12);
        buf.extend_from_slice(&(body.len() as u32).to_le_bytes());
        buf.extend_from_slice(&body);
        buf.extend_from_slice(&checksum(&body));
        self.file
            .write_all(&buf)
            .and_then(|_| self.file.sync_data())
            .with_context(|| format!("append to {}", self.path.display()))?;
        self.len += buf.len() as u64;
        Ok(())
    }

    /// Empties the log (after a checkpoint made its entries redundant).
    pub fn clear(&mut self) -> Result<()> {
        self.file.set_len(0)?;
        self.file.seek(SeekFrom::Start(0))?;
        self.file.sync_all()?;
        self.len = 0;
        Ok(())
    }

    /// Bytes in the log.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the log is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_survive_and_a_torn_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("wal.bin");
        {
            let (mut w, old) = Wal::open::<Vec<u32>>(&p).unwrap();
            assert!(old.is_empty());
            w.append(&vec![1u32, 2]).unwrap();
            w.append(&vec![3u32]).unwrap();
        }
        // A crash in the middle of a third append.
        let mut f = OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(&[40, 0, 0, 0, 9, 9]).unwrap();
        drop(f);
        let (mut w, got) = Wal::open::<Vec<u32>>(&p).unwrap();
        assert_eq!(got, vec![vec![1, 2], vec![3]]);
        w.append(&vec![4u32]).unwrap();
        drop(w);
        let (mut w, got) = Wal::open::<Vec<u32>>(&p).unwrap();
        assert_eq!(got, vec![vec![1, 2], vec![3], vec![4]]);
        // A flipped bit ends the log at the damaged entry.
        w.clear().unwrap();
        w.append(&vec![5u32]).unwrap();
        w.append(&vec![6u32]).unwrap();
        drop(w);
        let mut bytes = std::fs::read(&p).unwrap();
        let last = bytes.len() - 10;
        bytes[last] ^= 1;
        std::fs::write(&p, bytes).unwrap();
        let (_, got) = Wal::open::<Vec<u32>>(&p).unwrap();
        assert_eq!(got, vec![vec![5]]);
    }
}
