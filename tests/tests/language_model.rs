//! Language-model runs end to end: a Llama-style transformer on token shards trains in the
//! swarm exactly as in one process, exports a checkpoint Hugging Face loads with the same
//! logits, and its cheaters are caught like the image models'.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use integration_tests::{lm_config, Coordinator, Worker};
use trainer::reference::{train, ReferenceRun};
use trainer::tokens::{write_shard, write_synthetic, TokenDtype, TokenWindows};
use trainer::{LlamaConfig, ModelSpec, Net, OptimizerConfig, TrainData};

const STEPS: u64 = 6;
const BATCH: usize = 12;
const SEQ: usize = 16;

fn tiny() -> ModelSpec {
    let table = integration_tests::TINY_LLAMA.replace("[model.llama]", "");
    let cfg: LlamaConfig = toml::from_str(&table).unwrap();
    ModelSpec::Llama(Box::new(cfg))
}

fn shards(dir: &Path) -> std::path::PathBuf {
    let d = dir.join("shards");
    write_synthetic(&d, 20_000, 5).unwrap();
    d
}

fn reference(shards: &Path) -> Vec<f32> {
    tch::set_num_threads(1);
    let (train_set, _) = TokenWindows::load(shards, SEQ, 256).unwrap();
    let run = ReferenceRun {
        model: tiny(),
        seed: 7,
        batch: BATCH,
        optimizer: OptimizerConfig::default(),
    };
    train(&run, &TrainData::Tokens(train_set), STEPS, |_, _, _| Ok(())).unwrap()
}

/// A swarm of `n` workers (all present from the first step); returns the coordinator once
/// the run is over.
fn swarm(n: usize, shards: &Path, steps: u64, h: u32, extra: &str) -> Coordinator {
    let extra = format!("[workers]\ndeterministic_threads = 1\n\n{extra}");
    let cfg = lm_config(steps, BATCH, n, h, shards, SEQ, &extra);
    let mut c = Coordinator::start(&cfg);
    let join = c.join_string();
    let data_dir = shards.display().to_string();
    let _workers: Vec<Worker> = (0..n)
        .map(|i| {
            Worker::start(
                &join,
                c.dir.path(),
                &format!("w{i}"),
                &["--data-dir", &data_dir],
            )
        })
        .collect();
    assert!(c.wait(Duration::from_secs(240)).success(), "{}", c.log());
    c
}

fn params(c: &Coordinator) -> Vec<f32> {
    let layout = Net::new(&tiny(), tch::Device::Cpu, 0).layout();
    trainer::export::read_safetensors(&c.out().join("model.safetensors"), &layout).unwrap()
}

#[test]
fn one_worker_is_bitwise_equal_to_single_process_training() {
    let dir = tempfile::tempdir().unwrap();
    let s = shards(dir.path());
    let want = reference(&s);
    let c = swarm(1, &s, STEPS, 1, "");
    let got = params(&c);
    assert_eq!(got.len(), want.len());
    let differing = got
        .iter()
        .zip(&want)
        .filter(|(a, b)| a.to_bits() != b.to_bits())
        .count();
    assert_eq!(differing, 0, "{differing} parameters differ");
    // The run reports validation loss and perplexity, and exports a Hugging Face config.
    let evals = c.events("eval");
    let last = evals.last().expect("an evaluation");
    let (loss, ppl) = (
        last["val_loss"].as_f64().unwrap(),
        last["val_ppl"].as_f64().unwrap(),
    );
    assert!((ppl - loss.exp()).abs() < 1e-6 * ppl, "{last}");
    let hf: serde_json::Value =
        serde_json::from_slice(&std::fs::read(c.out().join("config.json")).unwrap()).unwrap();
    assert_eq!(hf["model_type"], "llama");
    assert_eq!(hf["num_key_value_heads"], 2);
}

#[test]
fn three_workers_match_single_process_training_within_float_tolerance() {
    let dir = tempfile::tempdir().unwrap();
    let s = shards(dir.path());
    let want = reference(&s);
    let c = swarm(3, &s, STEPS, 1, "");
    assert!(c.events("step").iter().all(|e| e["parts"] == 3));
    let got = params(&c);
    let max_diff = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    eprintln!("3 workers: max |swarm - reference| = {max_diff:e}");
    // Splitting a batch only reorders float sums (the mean over 3 parts instead of one);
    // Adam magnifies that at most to a tenth of one step (lr 1e-3).
    assert!(max_diff < 1e-4, "max difference {max_diff}");
}

#[test]
fn exported_checkpoint_gives_hugging_face_the_same_logits() {
    let dir = tempfile::tempdir().unwrap();
    let s = shards(dir.path());
    let c = swarm(
        1,
        &s,
        4,
        2,
        "[inner_optimizer]\nkind = \"adamw\"\nlr = 0.003\n",
    );
    // Logits of the exported weights on a fixed batch, computed by the Rust forward.
    let mut net = Net::new(&tiny(), tch::Device::Cpu, 0);
    net.set_flat_params(&params(&c)).unwrap();
    let (train_set, _) = TokenWindows::load(&s, SEQ, 256).unwrap();
    let (xs, _) = train_set.batch(&[0, 5, 9]).unwrap();
    let logits = tch::no_grad(|| net.forward(&xs));
    let tokens: Vec<i64> = Vec::try_from(xs.view([-1])).unwrap();
    let tokens: Vec<u8> = tokens
        .iter()
        .flat_map(|&t| (t as u32).to_le_bytes())
        .collect();
    let logits: Vec<f32> = Vec::try_from(logits.view([-1])).unwrap();
    let logits: Vec<u8> = logits.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(dir.path().join("tokens.bin"), tokens).unwrap();
    std::fs::write(dir.path().join("logits.bin"), logits).unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let python = root.join(".venv/bin/python");
    let out = Command::new(&python)
        .arg(root.join("scripts/hf_parity.py"))
        .arg("--model-dir")
        .arg(c.out())
        .arg("--tokens")
        .arg(dir.path().join("tokens.bin"))
        .arg("--logits")
        .arg(dir.path().join("logits.bin"))
        .args(["--batch", "3", "--seq", &SEQ.to_string(), "--tol", "1e-4"])
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}; run scripts/setup.sh", python.display()));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{text}");
    assert!(
        out.status.success(),
        "Hugging Face parity failed (is transformers installed? scripts/setup.sh installs it): {text}"
    );
}

#[test]
fn language_model_cheaters_are_caught() {
    let dir = tempfile::tempdir().unwrap();
    let s = shards(dir.path());
    let cheaters = ["noise", "sign-flip", "wrong-data"];
    let extra = "[verification]\np = 0.3\nnew_worker_p = 1.0\n";
    let cfg = lm_config(
        40,
        BATCH,
        2 + cheaters.len(),
        1,
        &s,
        SEQ,
        &format!("[workers]\ndeterministic_threads = 1\n\n{extra}"),
    );
    let mut c = Coordinator::start(&cfg);
    let join = c.join_string();
    let data_dir = s.display().to_string();
    let mut workers: Vec<Worker> = (0..2)
        .map(|i| {
            Worker::start(
                &join,
                c.dir.path(),
                &format!("honest{i}"),
                &["--data-dir", &data_dir],
            )
        })
        .collect();
    for m in cheaters {
        workers.push(Worker::start(
            &join,
            c.dir.path(),
            m,
            &["--data-dir", &data_dir, "--test-adversary", m],
        ));
    }
    assert!(c.wait(Duration::from_secs(300)).success(), "{}", c.log());
    let names = c.names();
    let banned: std::collections::HashSet<String> = c.summary()["banned"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|k| names.get(k.as_str()?).cloned())
        .collect();
    let want: std::collections::HashSet<String> = cheaters.iter().map(|s| s.to_string()).collect();
    assert_eq!(banned, want, "exactly the cheaters are banned; {}", c.log());
    for e in c.events("cheat_detected") {
        assert_eq!(e["evidence_valid"], true, "{e}");
    }
    let summary = c.summary();
    assert!(summary["checks_passed"].as_u64().unwrap() > 5, "{summary}");
}

#[test]
fn a_model_of_25_million_parameters_moves_over_loopback() {
    // fp32 both ways: every round the worker receives the full parameters (as a lossless
    // delta) and sends a full fp32 update, about 100 MB each, through one QUIC stream.
    let dir = tempfile::tempdir().unwrap();
    let s = shards(dir.path());
    let big = integration_tests::TINY_LLAMA
        .replace("hidden_size = 32", "hidden_size = 512")
        .replace("intermediate_size = 64", "intermediate_size = 1408")
        .replace("num_hidden_layers = 2", "num_hidden_layers = 8")
        .replace("num_attention_heads = 4", "num_attention_heads = 8")
        .replace("num_key_value_heads = 2", "num_key_value_heads = 8");
    let extra = "[verification]\np = 0.0\nnew_worker_p = 0.0\n\n[compression]\ncodec = \"fp32\"\n";
    let cfg = lm_config(3, 2, 1, 1, &s, SEQ, extra).replace(integration_tests::TINY_LLAMA, &big);
    let mut c = Coordinator::start(&cfg);
    let join = c.join_string();
    let data_dir = s.display().to_string();
    let w = Worker::start(&join, c.dir.path(), "w0", &["--data-dir", &data_dir]);
    assert!(
        c.wait(Duration::from_secs(300)).success(),
        "{}\n{}",
        c.log(),
        w.log()
    );
    let start = &c.events("start")[0];
    let n_params = start["n_params"].as_u64().unwrap();
    assert!(n_params >= 25_000_000, "{n_params} parameters");
    let s = c.summary();
    assert_eq!(s["steps"], 3, "{s}");
    // Three fp32 updates came in (zstd takes a few percent off them: more than two full
    // vectors' worth), and at least the first full parameter vector went out.
    assert!(s["bytes_in"].as_u64().unwrap() >= 2 * 4 * n_params, "{s}");
    assert!(s["bytes_out"].as_u64().unwrap() >= 4 * n_params / 2, "{s}");
}

#[test]
fn bad_language_model_inputs_are_refused_naming_the_file_and_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let good = shards(dir.path());
    let layout = Net::new(&tiny(), tch::Device::Cpu, 0).layout();
    // A shard whose bytes changed after its manifest was written.
    let tampered = dir.path().join("tampered");
    write_synthetic(&tampered, 20_000, 5).unwrap();
    let shard = tampered.join("train-00000.bin");
    let mut bytes = std::fs::read(&shard).unwrap();
    bytes[100] ^= 1;
    std::fs::write(&shard, bytes).unwrap();
    // A shard (with a matching manifest) holding a token id the model has no embedding for.
    let big_id = dir.path().join("big-id");
    let mut m = write_synthetic(&big_id, 20_000, 5).unwrap();
    let mut ids: Vec<u32> = (0..20_000).map(|i| 97 + i % 20).collect();
    ids[777] = 300;
    m.train = vec![write_shard(&big_id, "train-00000.bin", &ids, TokenDtype::U16).unwrap()];
    m.save(&big_id).unwrap();
    // Initial weights: one tensor missing, and a file that is not safetensors at all.
    let short = dir.path().join("short.safetensors");
    let net = Net::new(&tiny(), tch::Device::Cpu, 0);
    let flat = net.flat_params();
    let (last, shape) = layout.last().unwrap();
    let n_last = shape.iter().product::<i64>() as usize;
    trainer::export::write_safetensors(
        &short,
        &layout[..layout.len() - 1],
        &flat[..flat.len() - n_last],
        Default::default(),
    )
    .unwrap();
    std::fs::write(dir.path().join("garbage.safetensors"), b"not a checkpoint").unwrap();
    // And one tensor too many: accepted, the extra one named as left out.
    let mut wider = layout.clone();
    wider.push(("extra.weight".into(), vec![2]));
    let mut wider_flat = flat.clone();
    wider_flat.extend([0.5, 0.5]);
    trainer::export::write_safetensors(
        &dir.path().join("wider.safetensors"),
        &wider,
        &wider_flat,
        Default::default(),
    )
    .unwrap();

    let check = |cfg: String| {
        std::fs::write(dir.path().join("run.toml"), cfg).unwrap();
        let out = Command::new(integration_tests::bin("coordinator"))
            .current_dir(dir.path())
            .args(["check", "--config", "run.toml"])
            .env_remove("RUST_BACKTRACE")
            .env_remove("RUST_LIB_BACKTRACE")
            .output()
            .expect("run coordinator check");
        assert!(!dir.path().join("out").exists(), "nothing written");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let cfg =
        |shards: &Path, seq: usize, extra: &str| lm_config(4, BATCH, 1, 1, shards, seq, extra);
    let init = |file: &str| {
        cfg(&good, SEQ, "").replacen(
            "[model.llama]",
            &format!("init = \"{file}\"\n\n[model.llama]"),
            1,
        )
    };
    assert!(check(cfg(&good, SEQ, "")).0, "the good inputs pass");
    let (ok, err) = check(init("wider.safetensors"));
    assert!(ok && err.contains("left out: extra.weight"), "{err}");
    let missing = format!("tensor {last} is missing");
    let cases = [
        (
            cfg(&tampered, SEQ, ""),
            vec!["run.toml: data.shards", "train-00000.bin", "blake3"],
        ),
        (
            cfg(&big_id, SEQ, ""),
            vec![
                "run.toml: data.shards",
                "train-00000.bin",
                "token id 300",
                "vocab_size 256",
            ],
        ),
        (
            cfg(&good, SEQ, "").replace("num_attention_heads = 4", "num_attention_heads = 3"),
            vec!["run.toml", "hidden_size 32", "num_attention_heads 3"],
        ),
        (
            cfg(&good, SEQ, "").replace("num_key_value_heads = 2", "num_key_value_heads = 3"),
            vec!["run.toml", "num_key_value_heads 3"],
        ),
        (
            cfg(&good, 65, ""),
            vec!["run.toml", "data.seq_len 65", "max_position_embeddings"],
        ),
        (
            init("short.safetensors"),
            vec!["run.toml: model.init", "short.safetensors", &missing],
        ),
        (
            init("garbage.safetensors"),
            vec![
                "run.toml: model.init",
                "garbage.safetensors",
                "not a safetensors file",
            ],
        ),
    ];
    for (cfg, want) in cases {
        let (ok, err) = check(cfg);
        assert!(!ok, "refused: {want:?}");
        for w in want {
            assert!(err.contains(w), "{w:?} not in: {err}");
        }
    }
}
