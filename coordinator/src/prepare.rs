//! `coordinator data prepare`: text files to token shards with a manifest
//! ([`trainer::tokens`]). Tokenization is byte-level (ids are the UTF-8 bytes, vocabulary
//! 256) or any Hugging Face `tokenizer.json` through the `tokenizers` crate. Files are read
//! in the order given (folders: their files sorted by path), their ids laid end to end; the
//! validation shard is `val_fraction` of the stream held out as [`VAL_BLOCKS`] evenly spaced
//! blocks (the end of each of as many equal parts), so that it samples every part of the
//! corpus rather than its last files; the rest is cut into training shards of at most
//! `shard_tokens` ids.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use trainer::tokens::{write_shard, Manifest, TokenDtype, TokenizerInfo, FORMAT};

/// Blocks the validation shard is taken from (fewer when it has under two tokens a block).
pub const VAL_BLOCKS: usize = 64;

/// Which tokenizer.
#[derive(Clone, Debug)]
pub enum TokenizerChoice {
    /// Bytes are the ids.
    Byte,
    /// A Hugging Face `tokenizer.json`.
    File(PathBuf),
}

impl std::str::FromStr for TokenizerChoice {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(if s == "byte" {
            TokenizerChoice::Byte
        } else {
            TokenizerChoice::File(PathBuf::from(s))
        })
    }
}

/// What to prepare.
#[derive(Clone, Debug)]
pub struct PrepareOptions {
    /// Text files, or folders whose files (recursively, sorted) are all read.
    pub inputs: Vec<PathBuf>,
    /// The tokenizer.
    pub tokenizer: TokenizerChoice,
    /// Output folder (created; shards and `manifest.json` are replaced).
    pub out: PathBuf,
    /// Fraction of the tokens held out for validation, in (0, 0.5].
    pub val_fraction: f64,
    /// Most tokens per training shard.
    pub shard_tokens: u64,
    /// File name endings to skip inside folders (e.g. `.dat`, the index files of fortunes).
    pub skip_suffixes: Vec<String>,
}

/// Turns a file's bytes into token ids.
type Encoder = dyn Fn(&[u8]) -> Result<Vec<u32>>;

fn collect(path: &Path, skip: &[String], out: &mut Vec<PathBuf>) -> Result<()> {
    let meta = std::fs::metadata(path).with_context(|| format!("{}", path.display()))?;
    if meta.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("{}", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        for e in entries {
            let name = e.file_name().map(|n| n.to_string_lossy().to_string());
            let name = name.unwrap_or_default();
            if name.starts_with('.') || skip.iter().any(|s| name.ends_with(s.as_str())) {
                continue;
            }
            collect(&e, skip, out)?;
        }
    } else if meta.is_file() {
        out.push(path.to_path_buf());
    }
    Ok(())
}

/// Tokenizes the inputs and writes the shard folder; returns its manifest.
pub fn prepare(opts: &PrepareOptions) -> Result<Manifest> {
    if !(opts.val_fraction > 0.0 && opts.val_fraction <= 0.5) {
        bail!("--val-fraction {} must be in (0, 0.5]", opts.val_fraction);
    }
    if opts.shard_tokens == 0 {
        bail!("--shard-tokens must be >= 1");
    }
    let mut files = Vec::new();
    for p in &opts.inputs {
        collect(p, &opts.skip_suffixes, &mut files)?;
    }
    if files.is_empty() {
        bail!("no input files");
    }
    let (encode, info): (Box<Encoder>, TokenizerInfo) = match &opts.tokenizer {
        TokenizerChoice::Byte => (
            Box::new(|b: &[u8]| Ok(b.iter().map(|&x| u32::from(x)).collect())),
            TokenizerInfo::byte(),
        ),
        TokenizerChoice::File(path) => {
            let bytes =
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            let tok = tokenizers::Tokenizer::from_bytes(&bytes)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            let vocab = tok.get_vocab_size(true) as u32;
            let info = TokenizerInfo {
                kind: "huggingface".into(),
                vocab_size: vocab,
                blake3: blake3::hash(&bytes).to_hex().to_string(),
                file: Some("tokenizer.json".into()),
            };
            std::fs::create_dir_all(&opts.out)?;
            std::fs::write(opts.out.join("tokenizer.json"), &bytes)?;
            (
                Box::new(move |b: &[u8]| {
                    let text = String::from_utf8_lossy(b);
                    let enc = tok
                        .encode(text.as_ref(), false)
                        .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
                    Ok(enc.get_ids().to_vec())
                }),
                info,
            )
        }
    };
    let mut ids: Vec<u32> = Vec::new();
    for f in &files {
        let bytes = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
        ids.extend(encode(&bytes).with_context(|| format!("{}", f.display()))?);
    }
    if let Some(&bad) = ids.iter().find(|&&t| t >= info.vocab_size) {
        bail!(
            "the tokenizer produced id {bad}, not below its vocab_size {}",
            info.vocab_size
        );
    }
    let n_val = ((ids.len() as f64 * opts.val_fraction).ceil() as usize).max(2);
    if ids.len() < n_val + 2 {
        bail!(
            "only {} tokens: too few to hold out a validation shard",
            ids.len()
        );
    }
    let (train_ids, val_ids) = hold_out(&ids, n_val);
    let dtype = TokenDtype::for_vocab(info.vocab_size);
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("creating {}", opts.out.display()))?;
    let train = train_ids
        .chunks(opts.shard_tokens as usize)
        .enumerate()
        .map(|(i, chunk)| write_shard(&opts.out, &format!("train-{i:05}.bin"), chunk, dtype))
        .collect::<std::io::Result<Vec<_>>>()?;
    let val = write_shard(&opts.out, "val.bin", &val_ids, dtype)?;
    let manifest = Manifest {
        format: FORMAT.into(),
        tokenizer: info,
        train,
        val,
    };
    manifest.save(&opts.out)?;
    Ok(manifest)
}

/// Splits `ids` into training and `n_val` (at most half of them) validation ids: the end of
/// each of `blocks` equal parts (`n_val / blocks` ids, one more for the first
/// `n_val % blocks`) goes to validation, the rest (in order) to training.
fn hold_out(ids: &[u32], n_val: usize) -> (Vec<u32>, Vec<u32>) {
    let blocks = VAL_BLOCKS.min(n_val / 2).max(1);
    let part = ids.len() / blocks;
    let (mut train, mut val) = (Vec::with_capacity(ids.len()), Vec::with_capacity(n_val));
    for b in 0..blocks {
        let per = n_val / blocks + usize::from(b < n_val % blocks);
        let end = if b + 1 == blocks {
            ids.len()
        } else {
            (b + 1) * part
        };
        let start = end - per;
        train.extend_from_slice(&ids[b * part..start]);
        val.extend_from_slice(&ids[start..end]);
    }
    (train, val)
}

#[cfg(test)]
mod tests {
    use super::*;
    use trainer::tokens::TokenWindows;

    fn opts(dir: &Path, inputs: Vec<PathBuf>, tokenizer: TokenizerChoice) -> PrepareOptions {
        PrepareOptions {
            inputs,
            tokenizer,
            out: dir.join("shards"),
            val_fraction: 0.1,
            shard_tokens: 300,
            skip_suffixes: vec![".dat".into()],
        }
    }

    #[test]
    fn validation_samples_the_whole_corpus() {
        // Ten "files" of one letter each: validation holds some of every one.
        let ids: Vec<u32> = (0..10u32)
            .flat_map(|f| std::iter::repeat_n(f, 1000))
            .collect();
        let (train, val) = hold_out(&ids, 500);
        assert_eq!(train.len() + val.len(), ids.len());
        assert_eq!(val.len(), 500);
        for f in 0..10 {
            assert!(val.contains(&f), "file {f} has no validation ids");
        }
        assert!(
            train.windows(2).all(|w| w[0] <= w[1]),
            "training keeps the order"
        );
    }

    #[test]
    fn byte_level_shards_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let text = dir.path().join("text");
        std::fs::create_dir(&text).unwrap();
        std::fs::write(text.join("a"), "hello world, ".repeat(50)).unwrap();
        std::fs::write(text.join("b"), "é and more text ".repeat(20)).unwrap();
        std::fs::write(text.join("a.dat"), [0u8, 1, 2]).unwrap();
        let m = prepare(&opts(dir.path(), vec![text], TokenizerChoice::Byte)).unwrap();
        let total: u64 = m.train.iter().map(|s| s.tokens).sum::<u64>() + m.val.tokens;
        let want = 13 * 50 + "é and more text ".len() * 20;
        assert_eq!(total, want as u64, "the .dat file is skipped");
        assert!(m.train.len() > 1 && m.train.iter().all(|s| s.tokens <= 300));
        assert_eq!(m.train[0].dtype, TokenDtype::U16);
        let (tw, _) = TokenWindows::load(&dir.path().join("shards"), 8, 256).unwrap();
        let (x, _) = tw.batch(&[0]).unwrap();
        assert_eq!(
            Vec::<i64>::try_from(x.view([-1])).unwrap(),
            b"hello wo".map(i64::from).to_vec()
        );
    }

    #[test]
    fn hugging_face_tokenizer_json_is_used_and_copied() {
        let dir = tempfile::tempdir().unwrap();
        let tj = dir.path().join("tokenizer.json");
        std::fs::write(
            &tj,
            r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],
                "normalizer":null,"pre_tokenizer":{"type":"Whitespace"},"post_processor":null,
                "decoder":null,"model":{"type":"WordLevel","vocab":{"[UNK]":0,"the":1,"cat":2,"sat":3},
                "unk_token":"[UNK]"}}"#,
        )
        .unwrap();
        let text = dir.path().join("t.txt");
        std::fs::write(&text, "the cat sat the dog ".repeat(10)).unwrap();
        let m = prepare(&opts(dir.path(), vec![text], TokenizerChoice::File(tj))).unwrap();
        assert_eq!(m.tokenizer.vocab_size, 4);
        assert_eq!(m.tokenizer.kind, "huggingface");
        assert!(dir.path().join("shards/tokenizer.json").exists());
        let (tw, vw) = TokenWindows::load(&dir.path().join("shards"), 4, 4).unwrap();
        let (x, _) = tw.batch(&[0]).unwrap();
        assert_eq!(
            Vec::<i64>::try_from(x.view([-1])).unwrap(),
            vec![1, 2, 3, 1]
        );
        assert!(!vw.is_empty());
    }

    #[test]
    fn bad_options_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = opts(
            dir.path(),
            vec![dir.path().join("missing")],
            TokenizerChoice::Byte,
        );
        assert!(prepare(&o).is_err());
        o.val_fraction = 0.0;
        assert!(prepare(&o)
            .unwrap_err()
            .to_string()
            .contains("val-fraction"));
    }
}
