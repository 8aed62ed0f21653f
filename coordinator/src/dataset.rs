//! The run's data as the coordinator holds it: the training samples (for spot checks) and
//! the held-out set it evaluates on, chosen by the model: Fashion-MNIST for the image
//! models, token shards for a language model.

use std::path::PathBuf;

use anyhow::{Context, Result};
use trainer::tokens::{Manifest, TokenWindows};
use trainer::{Dataset, ModelSpec, TrainData};

use crate::RunConfig;

/// The data of a run.
pub struct RunData {
    /// Training samples.
    pub train: TrainData,
    /// Test images or validation windows.
    pub test: TrainData,
    /// The dataset kind announced to workers (`fashion-mnist` or `tokens`).
    pub name: &'static str,
    /// Input tokens per sample (0 for images).
    pub seq_len: u32,
    /// The tokenizer file to ship with the exported model, when the shards have one.
    pub tokenizer: Option<PathBuf>,
    /// The files a worker loads the training set from, by the names its loader expects:
    /// what the coordinator serves to workers that do not hold them.
    pub files: Vec<(String, PathBuf)>,
    /// A language-model run's training shards as windows without tokens (where each
    /// sample falls), for the prefetch hints; `None` for images.
    pub layout: Option<TokenWindows>,
}

/// Loads and checks the data the config names for `spec` (shard hashes, token ids below
/// the vocabulary, IDX shapes); errors name the file.
pub fn load(cfg: &RunConfig, spec: &ModelSpec) -> Result<RunData> {
    match spec {
        ModelSpec::Llama(c) => {
            let dir = cfg
                .data
                .shards
                .as_ref()
                .context("a language model needs data.shards")?;
            let field = format!("{} = {}", cfg.field("data.shards"), dir.display());
            if !dir.is_dir() {
                anyhow::bail!(
                    "{field}: no such folder (relative paths are taken from the config file's \
                     folder; `coordinator data prepare --out DIR` makes one)"
                );
            }
            let refused = || format!("{field}: the token shards are refused");
            let (train, val) =
                TokenWindows::load(dir, cfg.data.seq_len, c.vocab_size).with_context(refused)?;
            let manifest = Manifest::load(dir).with_context(refused)?;
            let counts: Vec<u64> = manifest.train.iter().map(|s| s.tokens).collect();
            let layout = TokenWindows::sparse(&counts, cfg.data.seq_len, [0; 32]);
            let files = std::iter::once(trainer::tokens::MANIFEST.to_string())
                .chain(manifest.train.iter().map(|s| s.file.clone()))
                .map(|f| (f.clone(), dir.join(f)))
                .collect();
            Ok(RunData {
                train: TrainData::Tokens(train),
                test: TrainData::Tokens(val),
                name: "tokens",
                seq_len: cfg.data.seq_len as u32,
                tokenizer: manifest.tokenizer.file.map(|f| dir.join(f)),
                files,
                layout: Some(layout),
            })
        }
        ModelSpec::Cnn | ModelSpec::Mlp => {
            let split = Dataset::load_split(&cfg.data.dir).with_context(|| {
                format!(
                    "{} = {}: the data set is refused",
                    cfg.field("data.dir"),
                    cfg.data.dir.display()
                )
            })?;
            Ok(RunData {
                train: split.train.into(),
                test: split.test.into(),
                name: "fashion-mnist",
                seq_len: 0,
                tokenizer: None,
                files: trainer::data::idx_files("train")
                    .into_iter()
                    .map(|f| (f.clone(), cfg.data.dir.join(f)))
                    .collect(),
                layout: None,
            })
        }
    }
}
