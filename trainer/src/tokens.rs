//! Tokenized text: shards of token ids and the windows a language model trains on.
//!
//! A shard is a flat little-endian array of `u16` (vocabularies up to 65,536) or `u32` token
//! ids, the layout of nanoGPT's and Psyche's `.bin` files, so already-tokenized data works
//! as it is. A folder of shards has a `manifest.json` ([`Manifest`]) that names every shard
//! with its token count, dtype and blake3, the tokenizer's digest, and a held-out
//! validation shard. Loading checks sizes before reading, every blake3, and every token id
//! against the model's vocabulary; errors name the file and the field.
//!
//! Sample `i` of a token set is the window of `seq_len + 1` tokens starting at
//! `i * seq_len` of the training shards laid end to end: inputs are its first `seq_len`
//! tokens, targets the last `seq_len`. The batch schedule permutes these sample indices
//! with the run's seed, and tasks name them, so a re-execution reads the same tokens.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::data::DataError;

/// File name of the manifest in a shard folder.
pub const MANIFEST: &str = "manifest.json";
/// Format tag of [`Manifest`].
pub const FORMAT: &str = "dtrain-tokens-v1";
/// Most tokens a token set may hold in all (2^34: 64 GiB as u32 in memory).
pub const MAX_TOKENS: u64 = 1 << 34;

/// Element type of a shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenDtype {
    /// Little-endian u16 (vocabularies up to 65,536).
    U16,
    /// Little-endian u32.
    U32,
}

impl TokenDtype {
    /// Bytes per token.
    pub fn width(self) -> u64 {
        match self {
            TokenDtype::U16 => 2,
            TokenDtype::U32 => 4,
        }
    }

    /// The narrowest type that holds ids below `vocab_size`.
    pub fn for_vocab(vocab_size: u32) -> Self {
        if vocab_size <= 1 << 16 {
            TokenDtype::U16
        } else {
            TokenDtype::U32
        }
    }
}

/// One shard file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardEntry {
    /// File name inside the shard folder (no path separators).
    pub file: String,
    /// Number of tokens.
    pub tokens: u64,
    /// Element type.
    pub dtype: TokenDtype,
    /// blake3 of the file's bytes, hex.
    pub blake3: String,
}

/// How the text was tokenized.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizerInfo {
    /// `byte` (ids are the bytes, vocabulary 256) or `huggingface` (a `tokenizer.json`).
    pub kind: String,
    /// Vocabulary size the ids stay below.
    pub vocab_size: u32,
    /// blake3 of the `tokenizer.json` (hex), or of the word `byte` for byte-level ids.
    pub blake3: String,
    /// The copy of `tokenizer.json` in the shard folder, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
}

impl TokenizerInfo {
    /// Byte-level ids: vocabulary 256, digest the blake3 of the word `byte`.
    pub fn byte() -> Self {
        TokenizerInfo {
            kind: "byte".into(),
            vocab_size: 256,
            blake3: blake3::hash(b"byte").to_hex().to_string(),
            file: None,
        }
    }
}

/// `manifest.json` of a shard folder.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Always [`FORMAT`].
    pub format: String,
    /// The tokenizer.
    pub tokenizer: TokenizerInfo,
    /// Training shards, in order.
    pub train: Vec<ShardEntry>,
    /// The held-out validation shard.
    pub val: ShardEntry,
}

impl Manifest {
    /// Reads and checks `dir/manifest.json` (format, file names, sizes).
    pub fn load(dir: &Path) -> Result<Self, DataError> {
        let path = dir.join(MANIFEST);
        let bad = |reason: String| DataError::Format {
            path: path.display().to_string(),
            reason,
        };
        let len = std::fs::metadata(&path)
            .map_err(|source| DataError::Io {
                path: path.display().to_string(),
                error: source,
            })?
            .len();
        if len > 16 << 20 {
            return Err(bad(format!("{len} bytes, more than 16 MiB")));
        }
        let bytes = std::fs::read(&path).map_err(|source| DataError::Io {
            path: path.display().to_string(),
            error: source,
        })?;
        let m: Manifest = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
        if m.format != FORMAT {
            return Err(bad(format!("format {:?}, expected {FORMAT:?}", m.format)));
        }
        if m.train.is_empty() {
            return Err(bad("train: no shards".into()));
        }
        let mut total = 0u64;
        for s in m.train.iter().chain(std::iter::once(&m.val)) {
            if s.file.is_empty() || s.file.contains(['/', '\\']) || s.file.starts_with('.') {
                return Err(bad(format!("file {:?}: not a plain file name", s.file)));
            }
            if hex_digest(&s.blake3).is_none() {
                return Err(bad(format!("{}: blake3 is not 64 hex digits", s.file)));
            }
            total = total.saturating_add(s.tokens);
        }
        if total > MAX_TOKENS {
            return Err(bad(format!("{total} tokens, more than {MAX_TOKENS}")));
        }
        Ok(m)
    }

    /// Writes `dir/manifest.json`.
    pub fn save(&self, dir: &Path) -> std::io::Result<()> {
        let text = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(dir.join(MANIFEST), text)
    }

    /// What identifies the training tokens: blake3 over the ordered shard digests and
    /// counts (the shards' bytes are checked against these digests when loaded).
    pub fn train_digest(&self) -> [u8; 32] {
        let mut h = blake3::Hasher::new_derive_key("dtrain token shards v1");
        for s in &self.train {
            h.update(s.blake3.as_bytes());
            h.update(&s.tokens.to_le_bytes());
        }
        *h.finalize().as_bytes()
    }
}

fn hex_digest(s: &str) -> Option<[u8; 32]> {
    let b = s.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in b.chunks_exact(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

/// Reads one shard: checks its size against the manifest before reading, its blake3, and
/// that every id is below `vocab_size`; appends the ids to `out`.
pub fn read_shard(
    dir: &Path,
    s: &ShardEntry,
    vocab_size: u32,
    out: &mut Vec<u32>,
) -> Result<(), DataError> {
    let path: PathBuf = dir.join(&s.file);
    let p = path.display().to_string();
    let bad = |reason: String| DataError::Format {
        path: p.clone(),
        reason,
    };
    let io = |source| DataError::Io {
        path: p.clone(),
        error: source,
    };
    let want = s
        .tokens
        .checked_mul(s.dtype.width())
        .ok_or_else(|| bad("token count overflows".into()))?;
    let have = std::fs::metadata(&path).map_err(io)?.len();
    if have != want {
        return Err(bad(format!(
            "{have} bytes, the manifest says {} tokens of {:?} ({want} bytes)",
            s.tokens, s.dtype
        )));
    }
    let bytes = std::fs::read(&path).map_err(io)?;
    if blake3::hash(&bytes).to_hex().as_str() != s.blake3.to_ascii_lowercase() {
        return Err(bad(
            "blake3 does not match the manifest (the file changed after `coordinator data \
             prepare` wrote it: prepare the shards again, or restore the file)"
                .into(),
        ));
    }
    out.reserve(s.tokens as usize);
    let start = out.len();
    match s.dtype {
        TokenDtype::U16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|c| u32::from(u16::from_le_bytes([c[0], c[1]]))),
        ),
        TokenDtype::U32 => out.extend(
            bytes
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        ),
    }
    if let Some((i, &t)) = out[start..]
        .iter()
        .enumerate()
        .find(|(_, &t)| t >= vocab_size)
    {
        return Err(bad(format!(
            "token id {t} at position {i} is not below the model's vocab_size {vocab_size}"
        )));
    }
    Ok(())
}

/// A token stream cut into windows of `seq_len + 1` tokens (see the module docs), held as
/// consecutive pieces (a worker's are its shards), each loaded or not yet: a worker that
/// fetches shards as its tasks need them starts with none ([`TokenWindows::sparse`]) and
/// [`TokenWindows::fill`]s them.
#[derive(Clone)]
pub struct TokenWindows {
    parts: Vec<Part>,
    total: u64,
    seq_len: usize,
    digest: [u8; 32],
}

/// One piece of the stream: `len` tokens from token `start`.
#[derive(Clone)]
struct Part {
    start: u64,
    len: u64,
    tokens: std::sync::OnceLock<Vec<u32>>,
}

impl std::fmt::Debug for TokenWindows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenWindows")
            .field("tokens", &self.total)
            .field("parts", &self.parts.len())
            .field("seq_len", &self.seq_len)
            .finish()
    }
}

impl TokenWindows {
    /// Windows over `tokens`; `digest` identifies the tokens (a manifest's
    /// [`Manifest::train_digest`]).
    pub fn new(tokens: Vec<u32>, seq_len: usize, digest: [u8; 32]) -> Self {
        let w = Self::sparse(&[tokens.len() as u64], seq_len, digest);
        let _ = w.parts[0].tokens.set(tokens);
        w
    }

    /// Windows over pieces of `counts` tokens, none loaded yet.
    pub fn sparse(counts: &[u64], seq_len: usize, digest: [u8; 32]) -> Self {
        let mut start = 0;
        let parts = counts
            .iter()
            .map(|&len| {
                let p = Part {
                    start,
                    len,
                    tokens: Default::default(),
                };
                if len == 0 {
                    let _ = p.tokens.set(Vec::new());
                }
                start += len;
                p
            })
            .collect();
        TokenWindows {
            parts,
            total: start,
            seq_len: seq_len.max(1),
            digest,
        }
    }

    /// Token range `[start, end)` of window `i`.
    fn span(&self, i: u32) -> (u64, u64) {
        let start = u64::from(i) * self.seq_len as u64;
        (start, start + self.seq_len as u64 + 1)
    }

    /// The pieces that overlap tokens `[start, end)`.
    fn parts_of(&self, start: u64, end: u64) -> std::ops::Range<usize> {
        let first = self.parts.partition_point(|p| p.start + p.len <= start);
        let last = self.parts.partition_point(|p| p.start < end);
        first..last.max(first)
    }

    /// The pieces (shard positions) windows `indices` need that are not loaded, in order;
    /// indices out of range are left to [`TokenWindows::batch`] to refuse.
    pub fn missing(&self, indices: &[u32]) -> Vec<usize> {
        let mut out: Vec<usize> = indices
            .iter()
            .filter(|&&i| (i as usize) < self.len())
            .flat_map(|&i| {
                let (s, e) = self.span(i);
                self.parts_of(s, e)
            })
            .filter(|&p| self.parts[p].tokens.get().is_none())
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Which of the pieces `parts` exist and are not loaded (sorted, each once).
    pub fn unloaded(&self, parts: &[u32]) -> Vec<usize> {
        let mut out: Vec<usize> = parts
            .iter()
            .map(|&p| p as usize)
            .filter(|&p| self.parts.get(p).is_some_and(|x| x.tokens.get().is_none()))
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Loads piece `part` (its token count must match; a piece already loaded stays).
    pub fn fill(&self, part: usize, tokens: Vec<u32>) -> Result<(), String> {
        let p = self
            .parts
            .get(part)
            .ok_or_else(|| format!("no piece {part} of {}", self.parts.len()))?;
        if tokens.len() as u64 != p.len {
            return Err(format!(
                "piece {part}: {} tokens, expected {}",
                tokens.len(),
                p.len
            ));
        }
        let _ = p.tokens.set(tokens);
        Ok(())
    }

    /// Loads the training and validation windows of the shard folder `dir`, checking every
    /// shard (see [`read_shard`]) against `vocab_size`.
    pub fn load(
        dir: &Path,
        seq_len: usize,
        vocab_size: u32,
    ) -> Result<(TokenWindows, TokenWindows), DataError> {
        let (m, tw) = Self::load_manifest_and_train(dir, seq_len, vocab_size)?;
        let mut val = Vec::new();
        read_shard(dir, &m.val, vocab_size, &mut val)?;
        let vw = TokenWindows::new(val, seq_len, [0; 32]);
        enough(&vw, "val", dir, seq_len)?;
        Ok((tw, vw))
    }

    /// Loads only the training windows of the shard folder `dir` (what a worker needs: its
    /// `manifest.json` and training shards), checked as [`TokenWindows::load`] does.
    pub fn load_train(
        dir: &Path,
        seq_len: usize,
        vocab_size: u32,
    ) -> Result<TokenWindows, DataError> {
        Ok(Self::load_manifest_and_train(dir, seq_len, vocab_size)?.1)
    }

    fn load_manifest_and_train(
        dir: &Path,
        seq_len: usize,
        vocab_size: u32,
    ) -> Result<(Manifest, TokenWindows), DataError> {
        let m = Manifest::load(dir)?;
        if m.tokenizer.vocab_size > vocab_size {
            return Err(DataError::Format {
                path: dir.join(MANIFEST).display().to_string(),
                reason: format!(
                    "tokenizer.vocab_size {} is larger than the model's vocab_size \
                     {vocab_size} (the model's config, or shards of another tokenizer)",
                    m.tokenizer.vocab_size
                ),
            });
        }
        let mut train = Vec::new();
        for s in &m.train {
            read_shard(dir, s, vocab_size, &mut train)?;
        }
        let tw = TokenWindows::new(train, seq_len, window_digest(&m.train_digest(), seq_len));
        enough(&tw, "train", dir, seq_len)?;
        Ok((m, tw))
    }

    /// Tokens per window of inputs.
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// Number of windows.
    pub fn len(&self) -> usize {
        (self.total.saturating_sub(1) / self.seq_len as u64) as usize
    }

    /// Whether there is no whole window.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// What identifies the windows (tokens and `seq_len`).
    pub fn digest(&self) -> [u8; 32] {
        self.digest
    }

    /// Inputs and targets `[n, seq_len]` (int64) of windows `indices`.
    pub fn batch(&self, indices: &[u32]) -> Result<(Tensor, Tensor), crate::TrainError> {
        let (n, t) = (indices.len(), self.seq_len);
        let mut xs = Vec::with_capacity(n * t);
        let mut ys = Vec::with_capacity(n * t);
        for &i in indices {
            if i as usize >= self.len() {
                return Err(crate::TrainError::Index {
                    index: i,
                    len: self.len(),
                });
            }
            let (start, end) = self.span(i);
            let mut window = Vec::with_capacity(t + 1);
            for p in self.parts_of(start, end) {
                let part = &self.parts[p];
                let tokens = part
                    .tokens
                    .get()
                    .ok_or(crate::TrainError::Missing { index: i, part: p })?;
                let from = start.max(part.start) - part.start;
                let to = end.min(part.start + part.len) - part.start;
                window.extend_from_slice(&tokens[from as usize..to as usize]);
            }
            xs.extend(window[..t].iter().map(|&v| i64::from(v)));
            ys.extend(window[1..].iter().map(|&v| i64::from(v)));
        }
        let shape = [n as i64, t as i64];
        Ok((
            Tensor::from_slice(&xs).view(shape),
            Tensor::from_slice(&ys).view(shape),
        ))
    }
}

/// An error unless `w` holds at least one window.
fn enough(w: &TokenWindows, name: &str, dir: &Path, seq_len: usize) -> Result<(), DataError> {
    if w.is_empty() {
        return Err(DataError::Format {
            path: dir.join(MANIFEST).display().to_string(),
            reason: format!("{name}: fewer than seq_len + 1 = {} tokens", seq_len + 1),
        });
    }
    Ok(())
}

/// The digest of a token set's windows: the shards' digest and the window length.
pub fn window_digest(train_digest: &[u8; 32], seq_len: usize) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key("dtrain token windows v1");
    h.update(train_digest);
    h.update(&(seq_len as u64).to_le_bytes());
    *h.finalize().as_bytes()
}

/// Writes `ids` as a shard file `dir/file` of `dtype` and returns its manifest entry.
pub fn write_shard(
    dir: &Path,
    file: &str,
    ids: &[u32],
    dtype: TokenDtype,
) -> std::io::Result<ShardEntry> {
    let bytes: Vec<u8> = match dtype {
        TokenDtype::U16 => ids.iter().flat_map(|&t| (t as u16).to_le_bytes()).collect(),
        TokenDtype::U32 => ids.iter().flat_map(|&t| t.to_le_bytes()).collect(),
    };
    let tmp = dir.join(format!(".{file}.tmp"));
    std::fs::write(&tmp, &bytes)?;
    std::fs::rename(&tmp, dir.join(file))?;
    Ok(ShardEntry {
        file: file.to_string(),
        tokens: ids.len() as u64,
        dtype,
        blake3: blake3::hash(&bytes).to_hex().to_string(),
    })
}

/// A small shard folder of learnable synthetic text (byte ids), for tests: `n_tokens`
/// training tokens and a tenth as many for validation.
pub fn write_synthetic(dir: &Path, n_tokens: usize, seed: u64) -> std::io::Result<Manifest> {
    use rand::{Rng, SeedableRng};
    std::fs::create_dir_all(dir)?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let words = [
        "the ", "cat ", "sat ", "on ", "a ", "mat ", "and ", "dog ", "ran ", "far ", ". ",
    ];
    let mut text = Vec::new();
    while text.len() < n_tokens + n_tokens / 10 + 2 {
        text.extend_from_slice(words[rng.gen_range(0..words.len())].as_bytes());
    }
    let ids: Vec<u32> = text.iter().map(|&b| u32::from(b)).collect();
    let split = n_tokens;
    let train = write_shard(dir, "train-00000.bin", &ids[..split], TokenDtype::U16)?;
    let val = write_shard(dir, "val.bin", &ids[split..], TokenDtype::U16)?;
    let m = Manifest {
        format: FORMAT.into(),
        tokenizer: TokenizerInfo::byte(),
        train: vec![train],
        val,
    };
    m.save(dir)?;
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("dtrain-tokens-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn windows_are_shifted_by_one() {
        let w = TokenWindows::new((0..21).collect(), 4, [0; 32]);
        assert_eq!(w.len(), 5);
        let (x, y) = w.batch(&[1, 4]).unwrap();
        assert_eq!(
            Vec::<i64>::try_from(x.view([-1])).unwrap(),
            vec![4, 5, 6, 7, 16, 17, 18, 19]
        );
        assert_eq!(
            Vec::<i64>::try_from(y.view([-1])).unwrap(),
            vec![5, 6, 7, 8, 17, 18, 19, 20]
        );
        assert!(w.batch(&[5]).is_err());
    }

    #[test]
    fn load_checks_hashes_sizes_and_vocab() {
        let d = tmp("load");
        let m = write_synthetic(&d, 2000, 1).unwrap();
        let (tw, vw) = TokenWindows::load(&d, 16, 256).unwrap();
        assert_eq!(tw.len(), 1999 / 16);
        assert!(!vw.is_empty());
        // A vocabulary smaller than the ids in the shard is refused, naming the file.
        let e = TokenWindows::load(&d, 16, 100).unwrap_err().to_string();
        assert!(e.contains("vocab_size"), "{e}");
        // A flipped byte fails the hash.
        let shard = d.join(&m.train[0].file);
        let mut bytes = std::fs::read(&shard).unwrap();
        bytes[10] ^= 1;
        std::fs::write(&shard, &bytes).unwrap();
        let e = TokenWindows::load(&d, 16, 256).unwrap_err().to_string();
        assert!(e.contains("train-00000.bin") && e.contains("blake3"), "{e}");
        // A truncated shard fails the size check before it is read.
        bytes.truncate(100);
        std::fs::write(&shard, &bytes).unwrap();
        let e = TokenWindows::load(&d, 16, 256).unwrap_err().to_string();
        assert!(e.contains("bytes"), "{e}");
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn manifest_refuses_paths_and_bad_digests() {
        let d = tmp("manifest");
        let mut m = write_synthetic(&d, 500, 2).unwrap();
        m.train[0].file = "../etc/passwd".into();
        m.save(&d).unwrap();
        assert!(Manifest::load(&d)
            .unwrap_err()
            .to_string()
            .contains("plain file name"));
        m.train[0].file = "train-00000.bin".into();
        m.val.blake3 = "zz".into();
        m.save(&d).unwrap();
        assert!(Manifest::load(&d)
            .unwrap_err()
            .to_string()
            .contains("blake3"));
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn sparse_windows_read_across_pieces_like_the_whole_stream() {
        let tokens: Vec<u32> = (0..103).collect();
        let whole = TokenWindows::new(tokens.clone(), 8, [1; 32]);
        let counts = [30u64, 0, 7, 50, 16];
        let sparse = TokenWindows::sparse(&counts, 8, [1; 32]);
        assert_eq!(sparse.len(), whole.len());
        let idx: Vec<u32> = (0..whole.len() as u32).collect();
        // Window 3 is tokens 24..33: pieces 0 (0..30) and 2 (30..37); the empty piece 1
        // needs nothing.
        assert_eq!(sparse.missing(&[3]), vec![0, 2]);
        assert_eq!(sparse.unloaded(&[4, 2, 1, 2, 99]), vec![2, 4]);
        assert_eq!(sparse.missing(&idx), vec![0, 2, 3, 4]);
        assert!(matches!(
            sparse.batch(&[3]),
            Err(crate::TrainError::Missing { index: 3, part: 0 })
        ));
        assert!(sparse.fill(0, vec![0; 29]).is_err());
        let mut at = 0usize;
        for (p, &n) in counts.iter().enumerate() {
            sparse
                .fill(p, tokens[at..at + n as usize].to_vec())
                .unwrap();
            at += n as usize;
        }
        assert!(sparse.missing(&idx).is_empty());
        let (a, b) = (whole.batch(&idx).unwrap(), sparse.batch(&idx).unwrap());
        assert!(a.0.equal(&b.0) && a.1.equal(&b.1));
        // Out of range is still an index error, not a missing piece.
        assert!(sparse.missing(&[999]).is_empty());
        assert!(matches!(
            sparse.batch(&[999]),
            Err(crate::TrainError::Index { .. })
        ));
    }
}
