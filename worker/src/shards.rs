//! The training shards of a language-model run, loaded as tasks need them: at join the
//! worker fetches only `manifest.json`; before a task it loads the shards the task's
//! windows fall in that it has not loaded yet, from `--data-dir` or the cache when they
//! are there, else from the coordinator ([`crate::fetch`]); and while a task computes, it
//! fetches in the background the shards the coordinator expects its next task to read (the
//! task's `prefetch`). A run whose tasks touch a few shards costs its volunteers a few
//! shards.

use std::path::Path;

use proto::DataFile;
use trainer::tokens::{read_shard, window_digest, Manifest, ShardEntry, TokenWindows};

use std::sync::Arc;

use trainer::TrainData;

use crate::fetch::{self, CacheOptions, FetchError};

/// Where each training shard comes from.
pub struct LazyShards {
    entries: Vec<ShardEntry>,
    files: Vec<DataFile>,
    vocab_size: u32,
}

impl LazyShards {
    /// Reads the manifest in `dir` (already fetched and verified), matches every training
    /// shard with the coordinator's list of files (name, hash, length), and returns the
    /// shards with the run's windows, none loaded.
    pub fn open(
        dir: &Path,
        files: &[DataFile],
        seq_len: usize,
        vocab_size: u32,
    ) -> Result<(Self, TokenWindows), String> {
        let m = Manifest::load(dir).map_err(|e| e.to_string())?;
        if m.tokenizer.vocab_size > vocab_size {
            return Err(format!(
                "the run's tokenizer has {} ids, more than the model's vocab_size {vocab_size}",
                m.tokenizer.vocab_size
            ));
        }
        let mut shard_files = Vec::new();
        for s in &m.train {
            let f = files
                .iter()
                .find(|f| f.name == s.file)
                .ok_or_else(|| format!("the coordinator does not serve the shard {}", s.file))?;
            let bytes = s.tokens.checked_mul(s.dtype.width());
            if hex::encode(f.blake3) != s.blake3.to_ascii_lowercase() || bytes != Some(f.len) {
                return Err(format!(
                    "the coordinator serves {} with another hash or length than its manifest \
                     lists",
                    s.file
                ));
            }
            shard_files.push(f.clone());
        }
        let counts: Vec<u64> = m.train.iter().map(|s| s.tokens).collect();
        let windows =
            TokenWindows::sparse(&counts, seq_len, window_digest(&m.train_digest(), seq_len));
        Ok((
            LazyShards {
                entries: m.train,
                files: shard_files,
                vocab_size,
            },
            windows,
        ))
    }

    /// Loads shards `parts` into `windows`, fetching those that are not local; returns the
    /// bytes downloaded. `progressed` as for [`fetch::gather`].
    pub async fn load(
        &self,
        conn: &quinn::Connection,
        parts: &[usize],
        windows: &TokenWindows,
        (data_dir, cache): (Option<&Path>, &CacheOptions),
        progressed: &mut bool,
    ) -> Result<u64, FetchError> {
        let files: Vec<DataFile> = parts
            .iter()
            .filter_map(|&p| self.files.get(p).cloned())
            .collect();
        let gathered = fetch::gather(conn, &files, data_dir, cache, progressed).await?;
        let dir = gathered.dir().to_path_buf();
        let entries: Vec<(usize, ShardEntry)> = parts
            .iter()
            .filter_map(|&p| Some((p, self.entries.get(p)?.clone())))
            .collect();
        let vocab = self.vocab_size;
        let loaded = tokio::task::spawn_blocking(move || {
            entries
                .into_iter()
                .map(|(p, e)| {
                    let mut ids = Vec::new();
                    read_shard(&dir, &e, vocab, &mut ids).map(|()| (p, ids))
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .await
        .map_err(|e| FetchError::Link(format!("loading shards: {e}")))?
        .map_err(|e| FetchError::Coordinator(format!("a shard is unusable: {e}")))?;
        for (p, ids) in loaded {
            windows.fill(p, ids).map_err(FetchError::Coordinator)?;
        }
        Ok(gathered.downloaded)
    }
}

/// Fetches shards `parts` of the run's token windows in the background (a failure is only
/// logged: the shards are fetched again when a task needs them).
pub fn prefetch(
    lazy: Arc<LazyShards>,
    data: Arc<TrainData>,
    conn: quinn::Connection,
    parts: Vec<usize>,
    (data_dir, cache): (Option<std::path::PathBuf>, CacheOptions),
) {
    tokio::spawn(async move {
        let TrainData::Tokens(windows) = data.as_ref() else {
            return;
        };
        let mut moved = false;
        let from = (data_dir.as_deref(), &cache);
        match lazy.load(&conn, &parts, windows, from, &mut moved).await {
            Ok(n) => tracing::info!(
                shards = parts.len(),
                downloaded = n,
                "prefetched the shards the next task is likely to read"
            ),
            Err(e) => tracing::debug!("prefetch failed ({e}); shards come when a task needs them"),
        }
    });
}
