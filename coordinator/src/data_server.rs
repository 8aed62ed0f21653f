//! Serves the run's data files to workers that do not hold them, on data streams of their
//! connection (one request per stream, see [`proto::DataRequest`]), so that data never
//! waits behind tasks, results or challenges on the control stream, and goes out at a
//! lower QUIC priority than they do.
//!
//! Files are named by their BLAKE3 hash and sent with their outboard
//! ([`verify::blob`]), so a worker checks every 256 KiB group it receives. Uploads share
//! a token bucket (`[data] serve_max_mbps`) and a cap on uploads in flight
//! (`serve_max_streams`). A request outside the run's files, past a file's end, for more
//! than [`proto::MAX_GROUPS_PER_REQUEST`] groups, beyond [`REPEAT_FACTOR`] times the data
//! set per connection, or faster than [`REQUESTS_PER_S`] is refused and is an offence.

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
#[cfg(feature = "test-hooks")]
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use proto::{DataFile, DataPart, DataReply, DataRequest, MAX_DATA_FILES, MAX_GROUPS_PER_REQUEST};
use tokio::sync::Semaphore;
use tracing::debug;
use verify::blob;

use crate::server::Bucket;

/// A connection may be sent at most this many times the whole data set (honest workers
/// fetch it once, and refetch a few bad groups).
pub const REPEAT_FACTOR: u64 = 3;

/// Data requests per second one connection may make (burst: twice that); faster requests
/// wait their turn, and a request that would wait more than [`MAX_REQUEST_WAIT`] is refused.
pub const REQUESTS_PER_S: f64 = 64.0;

/// The longest a request may wait for the request rate before it is refused as a flood.
pub const MAX_REQUEST_WAIT: Duration = Duration::from_secs(10);

/// Uploads of one connection in flight at once, so that one worker cannot hold every
/// upload slot.
pub const UPLOADS_PER_CONN: usize = 2;

/// A piece that cannot be written for this long ends its upload (the worker stopped
/// reading), freeing its slot.
const PIECE_TIMEOUT: Duration = Duration::from_secs(30);

/// Bytes written to a data stream at a time (each piece waits for the bandwidth bucket).
const PIECE: usize = 64 << 10;

/// One file being served.
struct Served {
    path: PathBuf,
    file: std::fs::File,
    len: u64,
    outboard: Vec<u8>,
}

/// The run's data files, ready to be served.
pub struct DataServer {
    files: HashMap<[u8; 32], Served>,
    list: Vec<DataFile>,
    total: u64,
    uploads: Arc<Semaphore>,
    bucket: Mutex<Bucket>,
    /// TEST ONLY: group replies still to corrupt (one flipped byte each).
    #[cfg(feature = "test-hooks")]
    corrupt: AtomicU64,
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// What was wrong, sent to the worker.
    pub reason: String,
}

/// What one connection has asked for so far.
pub struct ConnData {
    served: u64,
    requests: Bucket,
}

impl Default for ConnData {
    fn default() -> Self {
        ConnData {
            served: 0,
            requests: Bucket::new(REQUESTS_PER_S),
        }
    }
}

impl ConnData {
    /// Bytes sent to this connection on data streams.
    pub fn served(&self) -> u64 {
        self.served
    }
}

/// A checked request: which bytes of which file to send, after waiting `wait` for the
/// request rate.
struct Plan<'a> {
    served: &'a Served,
    what: Range,
    wait: Duration,
}

enum Range {
    Outboard,
    Bytes(u64, u64),
}

impl DataServer {
    /// Hashes `files` (name for the worker's loader, path here) and computes their outboards;
    /// `max_mbps` and `max_streams` are the serving limits. Errors name the file.
    pub fn open(files: &[(String, PathBuf)], max_mbps: f64, max_streams: usize) -> Result<Self> {
        anyhow::ensure!(
            files.len() <= MAX_DATA_FILES,
            "the data set has {} files, more than {MAX_DATA_FILES}",
            files.len()
        );
        let mut served = HashMap::new();
        let mut list = Vec::new();
        let mut total = 0u64;
        for (name, path) in files {
            let (hash, s) = hash_file(path)?;
            total += s.len;
            list.push(DataFile {
                name: name.clone(),
                len: s.len,
                blake3: hash,
            });
            served.insert(hash, s);
        }
        Ok(DataServer {
            files: served,
            list,
            total,
            uploads: Arc::new(Semaphore::new(max_streams.max(1))),
            // A burst of a tenth of a second at most: the cap holds over short windows.
            bucket: Mutex::new(Bucket::with_cap(
                max_mbps * 125_000.0,
                (max_mbps * 12_500.0).max(PIECE as f64),
            )),
            #[cfg(feature = "test-hooks")]
            corrupt: AtomicU64::new(0),
        })
    }

    /// The files, as the Welcome lists them.
    pub fn files(&self) -> &[DataFile] {
        &self.list
    }

    /// Total bytes of the data set.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// TEST ONLY: flip one byte in each of the next `n` group replies.
    #[cfg(feature = "test-hooks")]
    pub fn corrupt_next(&self, n: u64) {
        self.corrupt.store(n, Ordering::Relaxed);
    }

    /// Checks a request against the run's files and what the connection has asked for.
    fn plan(&self, req: &DataRequest, conn: &mut ConnData) -> Result<Plan<'_>, Refusal> {
        let refuse = |reason: String| Err(Refusal { reason });
        let wait = conn.requests.take(1.0);
        if wait > MAX_REQUEST_WAIT {
            return refuse(format!(
                "far more than {REQUESTS_PER_S} data requests a second"
            ));
        }
        let Some(s) = self.files.get(&req.blake3) else {
            return refuse(format!(
                "{} is not a file of this run",
                hex::encode(&req.blake3[..8])
            ));
        };
        let (what, n) = match req.part {
            DataPart::Outboard => (Range::Outboard, s.outboard.len() as u64),
            DataPart::Groups { first, count } => {
                if count == 0 || count > MAX_GROUPS_PER_REQUEST {
                    return refuse(format!(
                        "{count} groups asked, allowed 1..={MAX_GROUPS_PER_REQUEST}"
                    ));
                }
                let last = first.saturating_add(u64::from(count) - 1);
                let (Some((start, _)), Some((_, end))) = (
                    blob::group_range(s.len, first),
                    blob::group_range(s.len, last),
                ) else {
                    return refuse(format!(
                        "groups {first}..{} are past the end of a file of {} groups",
                        last.saturating_add(1),
                        blob::groups(s.len)
                    ));
                };
                (Range::Bytes(start, end), end - start)
            }
        };
        let cap = REPEAT_FACTOR * self.total + (16 << 20);
        if conn.served + n > cap {
            return refuse(format!(
                "asked for more than {REPEAT_FACTOR} times the data set ({} bytes)",
                self.total
            ));
        }
        conn.served += n;
        Ok(Plan {
            served: s,
            what,
            wait,
        })
    }

    /// Answers the one request of a data stream; returns the bytes sent, or the refusal
    /// (already sent to the worker), which is an offence. `uploads` holds the connection's
    /// upload slots ([`UPLOADS_PER_CONN`]).
    pub async fn serve_stream(
        &self,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
        conn: &Mutex<ConnData>,
        uploads: &Semaphore,
    ) -> Result<u64, Refusal> {
        // The coordinator's control messages go first.
        let _ = send.set_priority(-1);
        let read = proto::read_frame::<_, DataRequest>(&mut recv, 1024);
        let req = match tokio::time::timeout(Duration::from_secs(10), read).await {
            Ok(Ok((req, _))) => req,
            // The connection went away: nothing wrong was asked.
            Ok(Err(proto::FrameError::Io(_))) => return Ok(0),
            Ok(Err(e)) => {
                return Err(Refusal {
                    reason: format!("malformed data request: {e}"),
                })
            }
            Err(_) => {
                return Err(Refusal {
                    reason: "a data stream without a request for 10 s".into(),
                })
            }
        };
        let plan = match conn.lock() {
            Ok(mut c) => self.plan(&req, &mut c),
            Err(_) => return Ok(0),
        };
        let plan = match plan {
            Ok(p) => p,
            Err(r) => {
                let reply = DataReply::Refused {
                    reason: r.reason.clone(),
                };
                let _ = proto::write_frame(&mut send, &reply, 1 << 16).await;
                let _ = send.finish();
                return Err(r);
            }
        };
        if !plan.wait.is_zero() {
            tokio::time::sleep(plan.wait).await;
        }
        let (Ok(_mine), Ok(_any)) = (uploads.acquire().await, self.uploads.acquire().await) else {
            return Ok(0);
        };
        let bytes = match plan.what {
            Range::Outboard => plan.served.outboard.clone(),
            Range::Bytes(start, end) => {
                let path = plan.served.path.clone();
                let read = plan.served.file.try_clone().map(|f| {
                    tokio::task::spawn_blocking(move || {
                        let mut buf = vec![0u8; (end - start) as usize];
                        f.read_exact_at(&mut buf, start).map(|()| buf)
                    })
                });
                let buf = match read {
                    Ok(task) => task.await.unwrap_or_else(|e| Err(std::io::Error::other(e))),
                    Err(e) => Err(e),
                };
                #[allow(unused_mut)]
                let mut buf = match buf {
                    Ok(b) => b,
                    Err(e) => {
                        // The worker sees a short stream and asks again; the operator sees why.
                        tracing::error!("reading {}: {e}", path.display());
                        return Ok(0);
                    }
                };
                #[cfg(feature = "test-hooks")]
                self.maybe_corrupt(&mut buf);
                buf
            }
        };
        let reply = DataReply::Ok {
            len: bytes.len() as u64,
        };
        if proto::write_frame(&mut send, &reply, 1 << 16)
            .await
            .is_err()
        {
            return Ok(0);
        }
        for piece in bytes.chunks(PIECE) {
            let wait = match self.bucket.lock() {
                Ok(mut b) => b.take(piece.len() as f64),
                Err(_) => Duration::ZERO,
            };
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
            match tokio::time::timeout(PIECE_TIMEOUT, send.write_all(piece)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    debug!("data stream closed by the worker: {e}");
                    return Ok(0);
                }
                Err(_) => {
                    debug!("the worker stopped reading a data stream; upload dropped");
                    let _ = send.reset(0u32.into());
                    return Ok(0);
                }
            }
        }
        let _ = send.finish();
        Ok(bytes.len() as u64)
    }

    #[cfg(feature = "test-hooks")]
    fn maybe_corrupt(&self, buf: &mut [u8]) {
        let take = |n: u64| n.checked_sub(1);
        let took = self
            .corrupt
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, take);
        if took.is_ok() && !buf.is_empty() {
            let at = buf.len() / 2;
            buf[at] ^= 0x5a;
            tracing::warn!("TEST: corrupted one byte of a data reply");
        }
    }
}

/// Reads a file once: its BLAKE3 hash and outboard.
fn hash_file(path: &Path) -> Result<([u8; 32], Served)> {
    let what = || format!("data file {}", path.display());
    let mut file = std::fs::File::open(path).with_context(what)?;
    let mut ob = blob::Outboard::default();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).with_context(what)?;
        if n == 0 {
            break;
        }
        ob.update(&buf[..n]);
    }
    let (hash, len, outboard) = ob.finish();
    Ok((
        hash,
        Served {
            path: path.to_path_buf(),
            file,
            len,
            outboard,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(dir: &Path, sizes: &[usize]) -> DataServer {
        let files: Vec<(String, PathBuf)> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let p = dir.join(format!("f{i}"));
                std::fs::write(&p, (0..n).map(|j| (j % 251) as u8).collect::<Vec<_>>()).unwrap();
                (format!("f{i}"), p)
            })
            .collect();
        DataServer::open(&files, 100.0, 2).unwrap()
    }

    fn req(s: &DataServer, i: usize, part: DataPart) -> DataRequest {
        DataRequest {
            blake3: s.files()[i].blake3,
            part,
        }
    }

    #[test]
    fn files_are_named_by_their_blake3() {
        let d = tempfile::tempdir().unwrap();
        let s = server(d.path(), &[10, 600_000]);
        let bytes = std::fs::read(d.path().join("f1")).unwrap();
        assert_eq!(s.files()[1].blake3, *blake3::hash(&bytes).as_bytes());
        assert_eq!(s.files()[1].len, 600_000);
        assert_eq!(s.total(), 600_010);
    }

    #[test]
    fn bad_requests_are_refused_with_a_reason() {
        let d = tempfile::tempdir().unwrap();
        let s = server(d.path(), &[10, 600_000]);
        let mut c = ConnData::default();
        let groups = |first, count| DataPart::Groups { first, count };
        let unknown = DataRequest {
            blake3: [7; 32],
            part: DataPart::Outboard,
        };
        let cases = [
            (unknown, "not a file of this run"),
            (req(&s, 1, groups(3, 1)), "past the end"),
            (req(&s, 1, groups(2, 2)), "past the end"),
            (req(&s, 1, groups(u64::MAX, 1)), "past the end"),
            (req(&s, 1, groups(0, 0)), "groups asked"),
            (
                req(&s, 1, groups(0, MAX_GROUPS_PER_REQUEST + 1)),
                "groups asked",
            ),
        ];
        for (r, want) in cases {
            let e = s.plan(&r, &mut c).err().expect("refused");
            assert!(e.reason.contains(want), "{} vs {want}", e.reason);
        }
        assert_eq!(c.served(), 0);
        let p = s.plan(&req(&s, 1, groups(1, 2)), &mut c).ok().unwrap();
        assert!(matches!(p.what, Range::Bytes(262_144, 600_000)));
        assert_eq!(c.served(), 600_000 - 262_144);
    }

    #[test]
    fn a_connection_asking_for_the_set_again_and_again_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let s = server(d.path(), &[4 << 20]);
        let mut c = ConnData::default();
        let all = DataPart::Groups {
            first: 0,
            count: MAX_GROUPS_PER_REQUEST,
        };
        let mut ok = 0;
        let refused = loop {
            match s.plan(&req(&s, 0, all), &mut c) {
                Ok(_) => ok += 1,
                Err(e) => break e,
            }
        };
        // Three times the set plus the 16 MiB allowance (four more sets of 4 MiB).
        assert_eq!(ok, 3 + 4);
        assert!(refused.reason.contains("times the data set"), "{refused:?}");
    }

    #[test]
    fn requests_beyond_the_rate_wait_and_a_flood_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let s = server(d.path(), &[10]);
        let mut c = ConnData::default();
        let waits: Vec<Duration> = (0..2000)
            .map_while(|_| s.plan(&req(&s, 0, DataPart::Outboard), &mut c).ok())
            .map(|p| p.wait)
            .collect();
        // The burst (twice the rate) goes at once; then each request waits its turn, up to
        // 10 s of requests at the rate; the next is refused.
        assert!(waits[..120].iter().all(|w| w.is_zero()));
        assert!(waits[200] > Duration::from_millis(500), "{:?}", waits[200]);
        let n = waits.len();
        assert!((128 + 640 - 5..128 + 640 + 20).contains(&n), "{n}");
    }
}
