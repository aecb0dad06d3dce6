//! The tiny models' weights as plain f32 arrays (what the reference forward pass reads), saved
//! and loaded as safetensors with candle's own reader and writer.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{DType, Device};

/// One F32 tensor, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Tensor {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        let numel: usize = shape.iter().product();
        assert_eq!(
            numel,
            data.len(),
            "shape {shape:?} needs {numel} values, got {}",
            data.len()
        );
        Self { shape, data }
    }
}

/// Writes `tensors` to `path` as F32 safetensors.
pub fn write(path: &Path, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
    let candle: HashMap<&str, candle_core::Tensor> = tensors
        .iter()
        .map(|(name, t)| {
            let c = candle_core::Tensor::from_slice(&t.data, t.shape.as_slice(), &Device::Cpu)?;
            Ok((name.as_str(), c))
        })
        .collect::<Result<_>>()?;
    candle_core::safetensors::save(&candle, path)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Reads a safetensors file into a name-keyed map of F32 tensors (any float dtype converted).
pub fn read(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    let tensors = candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("cannot read {}", path.display()))?;
    tensors
        .into_iter()
        .map(|(name, t)| {
            let data = t
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()
                .with_context(|| format!("{}: tensor {name}", path.display()))?;
            Ok((name, Tensor::new(t.dims().to_vec(), data)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        let dir = std::env::temp_dir().join(format!("st-roundtrip-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("m.safetensors");
        let mut ts = BTreeMap::new();
        ts.insert(
            "a.weight".to_string(),
            Tensor::new(vec![2, 3], vec![1.0, -2.0, 3.5, 0.0, 1e-7, 6.0]),
        );
        ts.insert("b".to_string(), Tensor::new(vec![1], vec![42.0]));
        write(&p, &ts).unwrap();
        assert_eq!(read(&p).unwrap(), ts);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
