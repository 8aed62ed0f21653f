//! Model export in safetensors format, loadable by PyTorch users with
//! `safetensors.torch.load_file(path)` (names as in the model: `conv1.weight`, ...).

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};

use crate::TrainError;

/// Writes `flat` as named tensors following `layout` to `path` (atomically: temp file,
/// fsync, rename). `metadata` goes into the safetensors header.
pub fn write_safetensors(
    path: &Path,
    layout: &[(String, Vec<i64>)],
    flat: &[f32],
    metadata: HashMap<String, String>,
) -> Result<(), TrainError> {
    let total: usize = layout
        .iter()
        .map(|(_, s)| s.iter().product::<i64>() as usize)
        .sum();
    if total != flat.len() {
        return Err(TrainError::Length {
            expected: total,
            got: flat.len(),
        });
    }
    let bytes: Vec<u8> = flat.iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut views = Vec::with_capacity(layout.len());
    let mut o = 0;
    for (name, shape) in layout {
        let n = shape.iter().product::<i64>() as usize;
        let shape: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
        let view = TensorView::new(Dtype::F32, shape, &bytes[o * 4..(o + n) * 4])
            .map_err(|e| TrainError::Export(e.to_string()))?;
        views.push((name.clone(), view));
        o += n;
    }
    let data = safetensors::tensor::serialize(views, &Some(metadata))
        .map_err(|e| TrainError::Export(e.to_string()))?;
    let tmp = path.with_extension("safetensors.tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&data)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Reads a safetensors file (ours, or a Hugging Face checkpoint with the same tensor
/// names) into a flat vector in `layout` order: the `init` weights of a run, and tests.
/// F32, BF16 and F16 tensors are read (widened to f32). Errors name the file and the tensor:
/// a missing tensor, a shape other than the layout's, another dtype, a non-finite value.
pub fn read_safetensors(
    path: &Path,
    layout: &[(String, Vec<i64>)],
) -> Result<Vec<f32>, TrainError> {
    let file = path.display();
    let bytes = std::fs::read(path).map_err(|e| TrainError::Weights(format!("{file}: {e}")))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| {
        TrainError::Weights(format!(
            "{file}: not a safetensors file ({e}; a Git LFS pointer or another format?)"
        ))
    })?;
    // Tensors the model has no place for (an LM head beside a tied embedding, a checkpoint
    // of a larger model) are left out, and said so.
    let unused: Vec<&str> = st
        .names()
        .into_iter()
        .map(String::as_str)
        .filter(|n| !layout.iter().any(|(name, _)| name == n))
        .collect();
    if !unused.is_empty() {
        tracing::warn!(
            "{file}: {} tensor(s) the model has no place for are left out: {}",
            unused.len(),
            unused[..unused.len().min(8)].join(", ")
        );
    }
    let mut out = Vec::new();
    for (name, shape) in layout {
        let t = st
            .tensor(name)
            .map_err(|_| TrainError::Weights(format!("{file}: tensor {name} is missing")))?;
        let want: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
        if t.shape() != want.as_slice() {
            return Err(TrainError::Weights(format!(
                "{file}: tensor {name} has shape {:?}, the model needs {want:?}",
                t.shape()
            )));
        }
        let start = out.len();
        match t.dtype() {
            Dtype::F32 => out.extend(
                t.data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            ),
            Dtype::BF16 => out.extend(
                t.data()
                    .chunks_exact(2)
                    .map(|c| f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16)),
            ),
            Dtype::F16 => out.extend(
                t.data()
                    .chunks_exact(2)
                    .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()),
            ),
            other => {
                return Err(TrainError::Weights(format!(
                    "{file}: tensor {name} is {other:?}; F32, BF16 or F16 expected"
                )))
            }
        }
        if out[start..].iter().any(|v| !v.is_finite()) {
            return Err(TrainError::Weights(format!(
                "{file}: tensor {name} holds NaN or infinite values"
            )));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ModelSpec, Net};

    #[test]
    fn round_trip() {
        let net = Net::new(&ModelSpec::Mlp, tch::Device::Cpu, 1);
        let dir = std::env::temp_dir().join(format!("dtrain-export-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("m.safetensors");
        let flat = net.flat_params();
        write_safetensors(&p, &net.layout(), &flat, HashMap::new()).unwrap();
        assert_eq!(read_safetensors(&p, &net.layout()).unwrap(), flat);
        assert!(write_safetensors(&p, &net.layout(), &flat[1..], HashMap::new()).is_err());
        // Another model's layout: the error names the file and the missing tensor.
        let other = Net::new(&ModelSpec::Cnn, tch::Device::Cpu, 1).layout();
        let e = read_safetensors(&p, &other).unwrap_err().to_string();
        assert!(
            e.contains("m.safetensors") && e.contains("conv1.bias"),
            "{e}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
