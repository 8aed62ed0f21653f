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

/// Reads a safetensors file written by [`write_safetensors`] back into a flat vector in
/// `layout` order (used by tests and by users resuming from an exported model).
pub fn read_safetensors(
    path: &Path,
    layout: &[(String, Vec<i64>)],
) -> Result<Vec<f32>, TrainError> {
    let bytes = std::fs::read(path)?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| TrainError::Export(e.to_string()))?;
    let mut out = Vec::new();
    for (name, shape) in layout {
        let t = st
            .tensor(name)
            .map_err(|e| TrainError::Export(e.to_string()))?;
        let want: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
        if t.dtype() != Dtype::F32 || t.shape() != want.as_slice() {
            return Err(TrainError::Export(format!(
                "{name}: unexpected dtype or shape"
            )));
        }
        out.extend(
            t.data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ModelKind, Net};

    #[test]
    fn round_trip() {
        let net = Net::new(ModelKind::Mlp, tch::Device::Cpu, 1);
        let dir = std::env::temp_dir().join(format!("dtrain-export-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("m.safetensors");
        let flat = net.flat_params();
        write_safetensors(&p, &net.layout(), &flat, HashMap::new()).unwrap();
        assert_eq!(read_safetensors(&p, &net.layout()).unwrap(), flat);
        assert!(write_safetensors(&p, &net.layout(), &flat[1..], HashMap::new()).is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
