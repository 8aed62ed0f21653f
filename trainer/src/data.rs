//! Fashion-MNIST (and any MNIST-shaped IDX data set) from gzipped IDX files.

use std::io::Read;
use std::path::Path;

use flate2::read::GzDecoder;
use tch::{Kind, Tensor};

/// Where Debian's `dataset-fashion-mnist` package puts the files.
pub const DEFAULT_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// Per-pixel mean and standard deviation of the Fashion-MNIST training set (after /255).
const MEAN: f64 = 0.2860;
const STD: f64 = 0.3530;

/// Largest IDX file accepted (uncompressed), to bound memory on hostile input.
const MAX_IDX_BYTES: u64 = 512 << 20;

/// Errors while loading a data set.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file could not be opened or read.
    #[error("{path}: {error}")]
    Io {
        /// The file.
        path: String,
        /// The cause (shown in the message, so not also a `source` of the error chain).
        error: std::io::Error,
    },
    /// A file is not a valid IDX file of the expected shape.
    #[error("{path}: {reason}")]
    Format {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

/// An image classification data set held in memory as bytes.
#[derive(Clone)]
pub struct Dataset {
    /// Pixels, `len * rows * cols` bytes, row-major.
    pub images: Vec<u8>,
    /// One label per image.
    pub labels: Vec<u8>,
    /// Image height.
    pub rows: usize,
    /// Image width.
    pub cols: usize,
}

/// Training and test split.
pub struct Split {
    /// Training images.
    pub train: Dataset,
    /// Test images.
    pub test: Dataset,
}

/// The file names of the `prefix` (`train` or `t10k`) split: images, then labels.
pub fn idx_files(prefix: &str) -> [String; 2] {
    [
        format!("{prefix}-images-idx3-ubyte.gz"),
        format!("{prefix}-labels-idx1-ubyte.gz"),
    ]
}

fn read_gz(path: &Path) -> Result<Vec<u8>, DataError> {
    let io = |source| DataError::Io {
        path: path.display().to_string(),
        error: source,
    };
    let f = std::fs::File::open(path).map_err(io)?;
    let mut out = Vec::new();
    GzDecoder::new(f)
        .take(MAX_IDX_BYTES + 1)
        .read_to_end(&mut out)
        .map_err(io)?;
    if out.len() as u64 > MAX_IDX_BYTES {
        return Err(DataError::Format {
            path: path.display().to_string(),
            reason: format!("larger than {MAX_IDX_BYTES} bytes"),
        });
    }
    Ok(out)
}

/// Parses an IDX file; returns its dimensions and payload.
fn parse_idx(
    bytes: &[u8],
    want_dims: usize,
    path: &Path,
) -> Result<(Vec<usize>, Vec<u8>), DataError> {
    let bad = |reason: String| DataError::Format {
        path: path.display().to_string(),
        reason,
    };
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 || bytes[2] != 0x08 {
        return Err(bad("not an unsigned-byte IDX file".into()));
    }
    let ndims = bytes[3] as usize;
    if ndims != want_dims {
        return Err(bad(format!(
            "expected {want_dims} dimensions, found {ndims}"
        )));
    }
    let header = 4 + 4 * ndims;
    if bytes.len() < header {
        return Err(bad("truncated header".into()));
    }
    let dims: Vec<usize> = (0..ndims)
        .map(|i| {
            let o = 4 + 4 * i;
            u32::from_be_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]) as usize
        })
        .collect();
    let total = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    match total {
        Some(t) if t == bytes.len() - header => Ok((dims, bytes[header..].to_vec())),
        _ => Err(bad(format!(
            "dimensions {dims:?} do not match {} payload bytes",
            bytes.len() - header
        ))),
    }
}

impl Dataset {
    /// Loads one split (`train` or `t10k`) from `dir`.
    pub fn load_idx(dir: &Path, prefix: &str) -> Result<Self, DataError> {
        let [img, lbl] = idx_files(prefix);
        let (img_path, lbl_path) = (dir.join(img), dir.join(lbl));
        let (idims, images) = parse_idx(&read_gz(&img_path)?, 3, &img_path)?;
        let (ldims, labels) = parse_idx(&read_gz(&lbl_path)?, 1, &lbl_path)?;
        if idims[0] != ldims[0] {
            return Err(DataError::Format {
                path: lbl_path.display().to_string(),
                reason: format!("{} labels for {} images", ldims[0], idims[0]),
            });
        }
        if let Some(&l) = labels.iter().find(|&&l| l >= 10) {
            return Err(DataError::Format {
                path: lbl_path.display().to_string(),
                reason: format!("label {l} outside 0..10"),
            });
        }
        Ok(Dataset {
            images,
            labels,
            rows: idims[1],
            cols: idims[2],
        })
    }

    /// Loads the training and test splits from `dir`.
    pub fn load_split(dir: &Path) -> Result<Split, DataError> {
        Ok(Split {
            train: Dataset::load_idx(dir, "train")?,
            test: Dataset::load_idx(dir, "t10k")?,
        })
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the data set is empty.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// blake3 digest of the shape, pixels and labels: workers must hold the same data.
    pub fn digest(&self) -> [u8; 32] {
        let mut h = blake3::Hasher::new_derive_key("dtrain dataset v1");
        h.update(&(self.rows as u64).to_le_bytes());
        h.update(&(self.cols as u64).to_le_bytes());
        h.update(&(self.len() as u64).to_le_bytes());
        h.update(&self.images);
        h.update(&self.labels);
        *h.finalize().as_bytes()
    }

    /// A normalized image batch `[n,1,rows,cols]` and its labels `[n]` for `indices`.
    pub fn batch(&self, indices: &[u32]) -> Result<(Tensor, Tensor), crate::TrainError> {
        let px = self.rows * self.cols;
        let mut pixels = Vec::with_capacity(indices.len() * px);
        let mut labels = Vec::with_capacity(indices.len());
        for &i in indices {
            let iu = i as usize;
            if iu >= self.len() {
                return Err(crate::TrainError::Index {
                    index: i,
                    len: self.len(),
                });
            }
            pixels.extend_from_slice(&self.images[iu * px..(iu + 1) * px]);
            labels.push(i64::from(self.labels[iu]));
        }
        let n = indices.len() as i64;
        let xs = Tensor::from_slice(&pixels).to_kind(Kind::Float).view([
            n,
            1,
            self.rows as i64,
            self.cols as i64,
        ]);
        let xs = (xs / 255.0 - MEAN) / STD;
        Ok((xs, Tensor::from_slice(&labels)))
    }

    /// A small synthetic, learnable data set (class-dependent blobs plus noise) for tests.
    pub fn synthetic(n: usize, seed: u64) -> Self {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let (rows, cols) = (28usize, 28usize);
        let mut images = vec![0u8; n * rows * cols];
        let mut labels = vec![0u8; n];
        for i in 0..n {
            let c: u8 = rng.gen_range(0..10);
            labels[i] = c;
            let (cy, cx) = (4 + 2 * (c as usize % 5) * 2, 6 + (c as usize / 5) * 14);
            for y in 0..rows {
                for x in 0..cols {
                    let d2 = (y as i64 - cy as i64).pow(2) + (x as i64 - cx as i64).pow(2);
                    let v = if d2 < 20 { 200 } else { 0 } + rng.gen_range(0..50);
                    images[(i * rows + y) * cols + x] = v.min(255) as u8;
                }
            }
        }
        Dataset {
            images,
            labels,
            rows,
            cols,
        }
    }
}

/// A training or evaluation set of any kind: images with labels, or token windows.
#[derive(Clone)]
pub enum TrainData {
    /// An image classification set; a sample is an image.
    Images(Dataset),
    /// Tokenized text; a sample is a window of `seq_len + 1` tokens.
    Tokens(crate::tokens::TokenWindows),
}

impl From<Dataset> for TrainData {
    fn from(d: Dataset) -> Self {
        TrainData::Images(d)
    }
}

impl TrainData {
    /// Number of samples (images or windows).
    pub fn len(&self) -> usize {
        match self {
            TrainData::Images(d) => d.len(),
            TrainData::Tokens(t) => t.len(),
        }
    }

    /// Whether there is no sample.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// What identifies the samples: workers must hold the same.
    pub fn digest(&self) -> [u8; 32] {
        match self {
            TrainData::Images(d) => d.digest(),
            TrainData::Tokens(t) => t.digest(),
        }
    }

    /// Tokens per sample (0 for images): the unit of a language model's throughput.
    pub fn tokens_per_sample(&self) -> usize {
        match self {
            TrainData::Images(_) => 0,
            TrainData::Tokens(t) => t.seq_len(),
        }
    }

    /// Inputs and targets of `indices`: images `[n,1,rows,cols]` and labels `[n]`, or
    /// token ids `[n,seq]` and next tokens `[n,seq]`.
    pub fn batch(&self, indices: &[u32]) -> Result<(Tensor, Tensor), crate::TrainError> {
        match self {
            TrainData::Images(d) => d.batch(indices),
            TrainData::Tokens(t) => t.batch(indices),
        }
    }

    /// Samples per evaluation batch: 1,000 images, or about 16,384 tokens of windows.
    pub fn eval_batch(&self) -> usize {
        match self {
            TrainData::Images(_) => 1000,
            TrainData::Tokens(t) => (16_384 / t.seq_len()).max(1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idx_parser_checks_shape() {
        let p = Path::new("x");
        let mut ok = vec![0, 0, 8, 1, 0, 0, 0, 3];
        ok.extend_from_slice(&[1, 2, 3]);
        assert_eq!(parse_idx(&ok, 1, p).unwrap(), (vec![3], vec![1, 2, 3]));
        let mut short = ok.clone();
        short.pop();
        assert!(parse_idx(&short, 1, p).is_err());
        assert!(parse_idx(&ok, 3, p).is_err());
        assert!(parse_idx(&[0, 0, 9, 1], 1, p).is_err());
        // Dimensions whose product overflows are refused, not allocated.
        let huge = vec![
            0, 0, 8, 3, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255,
        ];
        assert!(parse_idx(&huge, 3, p).is_err());
    }

    #[test]
    fn batch_refuses_out_of_range_index() {
        let d = Dataset::synthetic(10, 1);
        let (xs, ys) = d.batch(&[0, 9]).unwrap();
        assert_eq!(xs.size(), vec![2, 1, 28, 28]);
        assert_eq!(ys.size(), vec![2]);
        assert!(matches!(
            d.batch(&[10]),
            Err(crate::TrainError::Index { index: 10, len: 10 })
        ));
    }

    #[test]
    fn digest_depends_on_content() {
        let a = Dataset::synthetic(10, 1);
        let mut b = a.clone();
        assert_eq!(a.digest(), b.digest());
        b.labels[3] = (b.labels[3] + 1) % 10;
        assert_ne!(a.digest(), b.digest());
    }
}
