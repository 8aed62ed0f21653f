//! Gets the run's data files before the worker takes tasks: from `--data-dir` when it
//! holds them, else from the cache, else from the coordinator on data streams of the
//! connection, verified group by group against the files' BLAKE3 names
//! ([`verify::blob`]). A bad group is asked for again alone; a coordinator that keeps
//! sending bad bytes for a group ([`ATTEMPTS`] times) is an error for the volunteer.

use std::collections::{HashSet, VecDeque};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use proto::{
    read_frame, write_frame, DataFile, DataPart, DataReply, DataRequest, DATA_STREAMS,
    MAX_GROUPS_PER_REQUEST,
};
use tracing::info;
use verify::blob;

use crate::cache::{file_hash, unusable, Cache, CacheLock};

/// Times a group (or an outboard) is asked for before the coordinator is given up on.
pub const ATTEMPTS: u32 = 3;

/// Why the data could not be had.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The connection failed; try again later.
    #[error("fetching the run's data: {0}")]
    Link(String),
    /// The coordinator refused a request or keeps sending bad bytes.
    #[error("fetching the run's data: {0}")]
    Coordinator(String),
    /// The cache cannot hold the data.
    #[error(transparent)]
    Cache(#[from] crate::cache::CacheError),
}

/// A folder holding the run's files under the names the loaders expect, valid while this
/// lives (it holds the cache's lock, so no other worker evicts a file before it is read).
pub struct Gathered {
    dir: PathBuf,
    _view: Option<tempfile::TempDir>,
    _lock: Option<CacheLock>,
    /// Bytes downloaded from the coordinator.
    pub downloaded: u64,
}

impl Gathered {
    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Where the cache is and how large it may grow.
#[derive(Clone, Debug)]
pub struct CacheOptions {
    /// The folder.
    pub dir: PathBuf,
    /// The cap in bytes.
    pub max_bytes: u64,
}

/// Gathers every file of `files`: a file of `data_dir` with the right name and hash, else
/// the cache's copy, else a download into the cache (which is then evicted down to its
/// cap). When `data_dir` holds them all the cache is not touched. `progressed` is set once a
/// verified group arrives (an unfinished download resumes where it stopped).
pub async fn gather(
    conn: &quinn::Connection,
    files: &[DataFile],
    data_dir: Option<&Path>,
    cache: &CacheOptions,
    progressed: &mut bool,
) -> Result<Gathered, FetchError> {
    if let Some(d) = data_dir {
        if files.iter().all(|f| has(&d.join(&f.name), f)) {
            info!(dir = %d.display(), "the run's data is in --data-dir; nothing to download");
            return Ok(Gathered {
                dir: d.to_path_buf(),
                _view: None,
                _lock: None,
                downloaded: 0,
            });
        }
    }
    let cache = Cache::open(&cache.dir, cache.max_bytes)?;
    let mut waited = false;
    let lock = loop {
        if let Some(l) = cache.try_lock()? {
            break l;
        }
        if !waited {
            info!(cache = %cache.dir().display(), "waiting for another worker using the same cache");
            waited = true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let mut located = Vec::new();
    let mut missing = Vec::new();
    let mut cached = 0;
    for f in files {
        match data_dir.map(|d| d.join(&f.name)) {
            Some(p) if has(&p, f) => located.push((f.name.clone(), p)),
            _ if cache.holds(f) => {
                cached += f.len;
                located.push((f.name.clone(), cache.path(&f.blake3)));
            }
            _ => missing.push(f.clone()),
        }
    }
    let need: u64 = missing.iter().map(|f| f.len).sum();
    cache.check_fits(cached + need)?;
    if missing.is_empty() {
        info!(files = files.len(), cache = %cache.dir().display(), "the run's data is all in the cache; nothing to download");
    } else {
        info!(
            files = missing.len(),
            bytes = need,
            cache = %cache.dir().display(),
            "downloading the run's data from the coordinator"
        );
        let mut progress = Progress::new(need);
        for f in &missing {
            let path = download(conn, f, &cache, &mut progress).await;
            *progressed |= progress.moved;
            located.push((f.name.clone(), path?));
        }
        progress.done();
    }
    let keep: HashSet<[u8; 32]> = files.iter().map(|f| f.blake3).collect();
    cache.evict(&keep)?;
    let view = tempfile::Builder::new()
        .prefix("dtrain-data-")
        .tempdir()
        .map_err(|e| FetchError::Link(format!("a temporary folder: {e}")))?;
    for (name, path) in &located {
        std::os::unix::fs::symlink(path, view.path().join(name))
            .map_err(|e| FetchError::Cache(unusable(view.path())(e)))?;
    }
    Ok(Gathered {
        dir: view.path().to_path_buf(),
        _view: Some(view),
        _lock: Some(lock),
        downloaded: need,
    })
}

/// Whether `path` holds `f` (length and BLAKE3).
fn has(path: &Path, f: &DataFile) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.len() == f.len)
        && file_hash(path).as_ref() == Some(&f.blake3)
}

/// Download progress, logged about every two seconds: bytes, rate, time left.
struct Progress {
    total: u64,
    got: u64,
    /// A group arrived from the coordinator.
    moved: bool,
    started: Instant,
    logged: Instant,
}

impl Progress {
    fn new(total: u64) -> Self {
        let now = Instant::now();
        Progress {
            total,
            got: 0,
            moved: false,
            started: now,
            logged: now,
        }
    }

    fn add(&mut self, n: u64) {
        self.got += n;
        if self.logged.elapsed() >= Duration::from_secs(2) {
            self.logged = Instant::now();
            let s = self.started.elapsed().as_secs_f64().max(1e-3);
            let rate = self.got as f64 / s;
            let eta = (self.total - self.got.min(self.total)) as f64 / rate.max(1.0);
            info!(
                "downloading data: {:.1} / {:.1} MB, {:.1} MB/s, {:.0} s left",
                self.got as f64 / 1e6,
                self.total as f64 / 1e6,
                rate / 1e6,
                eta
            );
        }
    }

    fn done(&self) {
        let s = self.started.elapsed().as_secs_f64();
        info!(
            "downloaded {:.1} MB of data in {s:.1} s ({:.1} MB/s), every group verified",
            self.got as f64 / 1e6,
            self.got as f64 / 1e6 / s.max(1e-3)
        );
    }
}

/// One request on its own stream; returns the bytes that follow an `Ok` reply.
async fn request(
    conn: &quinn::Connection,
    req: DataRequest,
    max_len: u64,
) -> Result<Vec<u8>, FetchError> {
    let link = |e: String| FetchError::Link(e);
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| link(e.to_string()))?;
    write_frame(&mut send, &req, 1024)
        .await
        .map_err(|e| link(e.to_string()))?;
    let _ = send.finish();
    let reply = read_frame::<_, DataReply>(&mut recv, 1 << 16)
        .await
        .map_err(|e| link(e.to_string()))?
        .0;
    match reply {
        DataReply::Refused { reason } => Err(FetchError::Coordinator(format!(
            "the coordinator refused a request: {}",
            reason.chars().take(256).collect::<String>()
        ))),
        DataReply::Ok { len } if len != max_len => Err(FetchError::Coordinator(format!(
            "the coordinator announced {len} bytes where {max_len} were asked for"
        ))),
        DataReply::Ok { len } => {
            let mut buf = vec![0u8; len as usize];
            recv.read_exact(&mut buf)
                .await
                .map_err(|e| link(format!("data stream cut short: {e}")))?;
            Ok(buf)
        }
    }
}

/// Downloads one file into the cache, verified.
async fn download(
    conn: &quinn::Connection,
    f: &DataFile,
    cache: &Cache,
    progress: &mut Progress,
) -> Result<PathBuf, FetchError> {
    let bad = |what: String| {
        FetchError::Coordinator(format!(
            "the coordinator sent bad bytes for {} {ATTEMPTS} times ({what}); it may be \
             faulty or hostile: try another run",
            f.name
        ))
    };
    let outboard = {
        let want = blob::outboard_len(f.len);
        let mut tries = 0;
        loop {
            if want == 0 {
                break Vec::new();
            }
            let ob = request(
                conn,
                DataRequest {
                    blake3: f.blake3,
                    part: DataPart::Outboard,
                },
                want,
            )
            .await?;
            if blob::root(&ob, f.len) == Some(f.blake3) {
                break ob;
            }
            tries += 1;
            if tries >= ATTEMPTS {
                return Err(bad("its outboard".into()));
            }
        }
    };
    let (part, file, resumed) = cache.part(&f.blake3, f.len)?;
    let groups = blob::groups(f.len);
    let done = if resumed {
        verified_groups(&file, f, &outboard).await
    } else {
        vec![false; groups as usize]
    };
    let here = done.iter().filter(|&&d| d).count();
    if here > 0 {
        info!(file = %f.name, groups = here, of = groups, "resuming an unfinished download");
        for g in (0..groups).filter(|&g| done[g as usize]) {
            let (s, e) = blob::group_range(f.len, g).unwrap_or((0, 0));
            progress.add(e - s);
        }
    }
    // Runs of missing groups, at most MAX_GROUPS_PER_REQUEST each: (first, count, attempt).
    let mut todo: VecDeque<(u64, u32, u32)> = VecDeque::new();
    for g in (0..groups).filter(|&g| !done[g as usize]) {
        match todo.back_mut() {
            Some((first, count, _))
                if *first + u64::from(*count) == g && *count < MAX_GROUPS_PER_REQUEST =>
            {
                *count += 1
            }
            _ => todo.push_back((g, 1, 0)),
        }
    }
    let mut inflight = tokio::task::JoinSet::new();
    loop {
        while inflight.len() < DATA_STREAMS as usize {
            let Some((first, count, attempt)) = todo.pop_front() else {
                break;
            };
            let (start, _) = blob::group_range(f.len, first).unwrap_or((0, 0));
            let (_, end) = blob::group_range(f.len, first + u64::from(count) - 1).unwrap_or((0, 0));
            let conn = conn.clone();
            let req = DataRequest {
                blake3: f.blake3,
                part: DataPart::Groups { first, count },
            };
            inflight.spawn(async move {
                let r = request(&conn, req, end - start).await;
                (first, count, attempt, r)
            });
        }
        let Some(joined) = inflight.join_next().await else {
            break;
        };
        let (first, count, attempt, bytes) = joined.map_err(|e| FetchError::Link(e.to_string()))?;
        let bytes = bytes?;
        let mut offset = 0usize;
        for g in first..first + u64::from(count) {
            let (s, e) = blob::group_range(f.len, g).unwrap_or((0, 0));
            let data = &bytes[offset..offset + (e - s) as usize];
            offset += (e - s) as usize;
            if blob::group_ok(&f.blake3, f.len, &outboard, g, data) {
                file.write_all_at(data, s)
                    .map_err(|e| FetchError::Cache(unusable(&part)(e)))?;
                progress.add(data.len() as u64);
                progress.moved = true;
            } else if attempt + 1 >= ATTEMPTS {
                return Err(bad(format!("group {g}")));
            } else {
                tracing::warn!(file = %f.name, group = g, "a data group failed its hash; asking again");
                todo.push_back((g, 1, attempt + 1));
            }
        }
    }
    Ok(cache.insert(&f.blake3, &part, file)?)
}

/// Which groups of an unfinished download already hold the right bytes (checked against the
/// outboard, off the async threads).
async fn verified_groups(file: &std::fs::File, f: &DataFile, outboard: &[u8]) -> Vec<bool> {
    let groups = blob::groups(f.len) as usize;
    let (Ok(file), f, outboard) = (file.try_clone(), f.clone(), outboard.to_vec()) else {
        return vec![false; groups];
    };
    let check = move || {
        (0..groups as u64)
            .map(|g| {
                let (s, e) = blob::group_range(f.len, g).unwrap_or((0, 0));
                let mut buf = vec![0u8; (e - s) as usize];
                file.read_exact_at(&mut buf, s).is_ok()
                    && blob::group_ok(&f.blake3, f.len, &outboard, g, &buf)
            })
            .collect()
    };
    tokio::task::spawn_blocking(check)
        .await
        .unwrap_or_else(|_| vec![false; groups])
}
