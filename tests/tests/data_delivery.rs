//! A volunteer needs only the binary and the join string: workers without a data folder
//! fetch the run's data files from the coordinator, verified group by group, into a cache
//! that later runs reuse; bad bytes are refetched, and a coordinator that keeps sending
//! them is a clear error.

use std::path::Path;
use std::time::Duration;

use integration_tests::{lm_config, quick_config, swarm_config, Coordinator, Worker};

/// Bytes a worker fetches for `files` in `dir`: each file and its outboard.
fn fetched(dir: &Path, files: &[String]) -> u64 {
    files
        .iter()
        .map(|f| std::fs::metadata(dir.join(f)).unwrap().len())
        .map(|n| n + verify::blob::outboard_len(n))
        .sum()
}

/// [`fetched`] for the training files of Debian's Fashion-MNIST.
fn fashion_train_bytes() -> u64 {
    let dir = Path::new(trainer::data::DEFAULT_DIR);
    fetched(dir, &trainer::data::idx_files("train"))
}

fn served(c: &Coordinator) -> Vec<u64> {
    c.events("data_served")
        .iter()
        .map(|e| e["bytes"].as_u64().unwrap())
        .collect()
}

#[test]
fn a_worker_with_an_empty_cache_fetches_the_image_data_and_the_next_run_reuses_it() {
    let home = tempfile::tempdir().unwrap();
    let cache = home.path().join("cache").display().to_string();
    let mut c = Coordinator::start(&swarm_config("mlp", 20, 64, 1, 1, ""));
    let w = Worker::start_fetching(
        &c.join_string(),
        home.path(),
        "w0",
        &["--cache-dir", &cache],
    );
    assert!(c.wait(Duration::from_secs(180)).success(), "{}", c.log());
    // Every byte of both files and their outboards, once.
    assert_eq!(served(&c), vec![fashion_train_bytes()], "{}", w.log());
    assert!(w.log().contains("every group verified"), "{}", w.log());
    assert!(c.steps_done() >= 20);
    drop(w);

    // Another run over the same data: the cache has it all.
    let mut c2 = Coordinator::start(&swarm_config("mlp", 10, 64, 1, 1, ""));
    let w2 = Worker::start_fetching(
        &c2.join_string(),
        home.path(),
        "w1",
        &["--cache-dir", &cache],
    );
    assert!(c2.wait(Duration::from_secs(180)).success(), "{}", c2.log());
    assert!(served(&c2).is_empty(), "{}", w2.log());
    assert!(w2.log().contains("all in the cache"), "{}", w2.log());
}

/// A shard folder of `n` training shards of `len` byte-level tokens and a validation shard.
fn shard_folder(dir: &Path, n: usize, len: usize) -> trainer::tokens::Manifest {
    use trainer::tokens::{write_shard, Manifest, TokenDtype, TokenizerInfo, FORMAT};
    std::fs::create_dir_all(dir).unwrap();
    let sentence = "the cat sat on the mat and the dog ran far. ";
    let text = sentence.repeat((n + 1) * len / sentence.len() + 1);
    let ids: Vec<u32> = text.bytes().map(u32::from).collect();
    let train = (0..n)
        .map(|i| {
            let name = format!("train-{i:05}.bin");
            write_shard(dir, &name, &ids[i * len..(i + 1) * len], TokenDtype::U16).unwrap()
        })
        .collect();
    let m = Manifest {
        format: FORMAT.into(),
        tokenizer: TokenizerInfo::byte(),
        train,
        val: write_shard(
            dir,
            "val.bin",
            &ids[n * len..(n + 1) * len],
            TokenDtype::U16,
        )
        .unwrap(),
    };
    m.save(dir).unwrap();
    m
}

/// Four training shards of 5,000 tokens.
fn four_shards(dir: &Path) -> trainer::tokens::Manifest {
    shard_folder(dir, 4, 5000)
}

#[test]
fn a_worker_prefetches_the_shards_its_next_task_reads() {
    let dir = tempfile::tempdir().unwrap();
    let shards = dir.path().join("shards");
    // 40 shards of 500 tokens: a task of 8 windows reads a few of them, the next round's
    // windows mostly others.
    shard_folder(&shards, 40, 500);
    let mut c = Coordinator::start(&lm_config(6, 8, 1, 1, &shards, 16, ""));
    let w = Worker::start_fetching(&c.join_string(), dir.path(), "w0", &[]);
    assert!(c.wait(Duration::from_secs(180)).success(), "{}", c.log());
    let log = w.log();
    assert!(
        log.contains("prefetched the shards the next task is likely to read"),
        "{log}"
    );
}

#[test]
fn a_worker_fetches_only_the_token_shards_its_tasks_touch() {
    let dir = tempfile::tempdir().unwrap();
    let shards = dir.path().join("shards");
    let m = four_shards(&shards);
    // Samples 0..8 only: windows of 17 tokens from token 0, all inside the first shard.
    let cfg = lm_config(4, 8, 1, 1, &shards, 16, "") + "train_limit = 8\n";
    let mut c = Coordinator::start(&cfg);
    let w = Worker::start_fetching(&c.join_string(), dir.path(), "w0", &[]);
    assert!(c.wait(Duration::from_secs(180)).success(), "{}", c.log());
    assert!(c.events("eval").last().is_some());
    // Before its first task it fetched the manifest alone.
    let manifest = fetched(&shards, &[trainer::tokens::MANIFEST.to_string()]);
    assert_eq!(served(&c), vec![manifest], "{}", w.log());
    // Then the one shard its tasks read: the cache holds those two files, no others.
    let mut blobs: Vec<String> = std::fs::read_dir(dir.path().join("cache/blobs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    blobs.sort();
    let manifest_hash = blake3::hash(&std::fs::read(shards.join("manifest.json")).unwrap());
    let mut want = vec![
        manifest_hash.to_hex().to_string(),
        m.train[0].blake3.clone(),
    ];
    want.sort();
    assert_eq!(blobs, want, "{}", w.log());
    assert!(
        w.log().contains("loaded the shards a task needs shards=1"),
        "{}",
        w.log()
    );
}

#[test]
fn corrupted_groups_are_fetched_again_and_never_trained_on() {
    let home = tempfile::tempdir().unwrap();
    let cfg = swarm_config("mlp", 10, 64, 1, 1, "");
    let mut c = Coordinator::start_with(&cfg, &["--test-corrupt-data", "3"]);
    let w = Worker::start_fetching(&c.join_string(), home.path(), "w0", &[]);
    assert!(c.wait(Duration::from_secs(180)).success(), "{}", c.log());
    let log = w.log();
    assert_eq!(
        log.matches("failed its hash; asking again").count(),
        3,
        "{log}"
    );
    // The three bad groups went out twice: 3 x 256 KiB more than the files.
    assert_eq!(served(&c), vec![fashion_train_bytes() + 3 * 256 * 1024]);
    // What the cache holds is the coordinator's files, byte for byte.
    for f in trainer::data::idx_files("train") {
        let want = std::fs::read(Path::new(trainer::data::DEFAULT_DIR).join(&f)).unwrap();
        let hash = blake3::hash(&want).to_hex().to_string();
        let got = std::fs::read(home.path().join("cache/blobs").join(hash)).unwrap();
        assert!(got == want, "{f} differs in the cache");
    }
}

#[test]
fn a_download_cut_short_resumes_where_it_stopped() {
    let home = tempfile::tempdir().unwrap();
    // 20 Mbit/s: the 26.5 MB take about 11 s; the first worker is killed after 4 s.
    let cfg = swarm_config("mlp", 10, 64, 1, 1, "[data]\nserve_max_mbps = 20\n");
    let mut c = Coordinator::start(&cfg);
    let mut first = Worker::start_fetching(&c.join_string(), home.path(), "w0", &[]);
    std::thread::sleep(Duration::from_secs(4));
    first.kill();
    let w = Worker::start_fetching(&c.join_string(), home.path(), "w1", &[]);
    assert!(c.wait(Duration::from_secs(180)).success(), "{}", c.log());
    let log = w.log();
    let resumed = log
        .lines()
        .find(|l| l.contains("resuming an unfinished download"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(!resumed.contains("groups=0 "), "{resumed}");
    // The second worker fetched only what the first had not.
    let second = served(&c);
    assert_eq!(second.len(), 1, "{log}");
    assert!(second[0] < fashion_train_bytes() * 3 / 4, "{second:?}");
    assert!(log.contains("every group verified"), "{log}");
}

#[test]
fn a_coordinator_that_keeps_sending_bad_bytes_is_a_clear_error_for_the_volunteer() {
    let home = tempfile::tempdir().unwrap();
    let cfg = quick_config("mlp", 5, 64, "127.0.0.1:0", "");
    let c = Coordinator::start_with(&cfg, &["--test-corrupt-data", "1000000"]);
    let mut w = Worker::start_fetching(&c.join_string(), home.path(), "w0", &[]);
    let status = w.wait(Duration::from_secs(60)).expect("exit");
    assert!(!status.success());
    let log = w.log();
    assert!(
        log.contains("sent bad bytes") && log.contains("3 times"),
        "{log}"
    );
    // Nothing half-verified is left in the cache.
    let blobs = std::fs::read_dir(home.path().join("cache/blobs"))
        .unwrap()
        .count();
    assert_eq!(blobs, 0);
}

#[test]
fn a_data_set_larger_than_the_cache_cap_is_a_clear_error() {
    let home = tempfile::tempdir().unwrap();
    let cfg = quick_config("mlp", 5, 64, "127.0.0.1:0", "");
    let c = Coordinator::start(&cfg);
    let mut w = Worker::start_fetching(
        &c.join_string(),
        home.path(),
        "w0",
        &["--cache-max-gb", "0.01"],
    );
    let status = w.wait(Duration::from_secs(60)).expect("exit");
    assert!(!status.success());
    assert!(w.log().contains("--cache-max-gb"), "{}", w.log());
    // Refused before anything was fetched.
    let blobs = std::fs::read_dir(home.path().join("cache/blobs"))
        .unwrap()
        .count();
    assert_eq!(blobs, 0);
    assert!(
        !w.log().contains("downloading the run's data"),
        "{}",
        w.log()
    );
}

#[test]
fn a_coordinator_whose_shards_do_not_match_their_manifest_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let shards = dir.path().join("shards");
    four_shards(&shards);
    let shard = shards.join("train-00002.bin");
    let mut bytes = std::fs::read(&shard).unwrap();
    bytes[7] ^= 1;
    std::fs::write(&shard, bytes).unwrap();
    let mut c = Coordinator::start(&lm_config(4, 8, 1, 1, &shards, 16, ""));
    assert!(!c.wait(Duration::from_secs(60)).success());
    let log = c.log();
    assert!(
        log.contains("train-00002.bin") && log.contains("blake3"),
        "{log}"
    );
    assert!(!c.out().join("join.txt").exists(), "it never listened");
}
