//! Minimal safetensors writer and reader (F32 only), written by hand so the test crate needs
//! no safetensors dependency.
//!
//! Format: 8-byte little-endian header length `N`, then `N` bytes of JSON
//! `{"name": {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, ...,
//! "__metadata__": {...}}` (offsets relative to the end of the header), then the raw
//! little-endian tensor data. The header is padded with spaces to a multiple of 8 bytes so
//! every tensor starts 8-byte aligned, as the reference implementation does.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Map, Value};

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

/// The file contents for `tensors` (in name order).
pub fn to_bytes(tensors: &BTreeMap<String, Tensor>) -> Vec<u8> {
    let mut header = Map::new();
    let mut offset = 0usize;
    for (name, t) in tensors {
        let bytes = t.data.len() * 4;
        header.insert(
            name.clone(),
            json!({"dtype": "F32", "shape": t.shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    header.insert(
        "__metadata__".to_string(),
        json!({"format": "pt", "generator": "freekv-integration-tests tiny_models"}),
    );
    let mut header_bytes = serde_json::to_vec(&Value::Object(header)).expect("json");
    while !header_bytes.len().is_multiple_of(8) {
        header_bytes.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + header_bytes.len() + offset);
    out.extend_from_slice(&(header_bytes.len() as u64).to_le_bytes());
    out.extend_from_slice(&header_bytes);
    for t in tensors.values() {
        for v in &t.data {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    out
}

/// Writes `tensors` to `path`.
pub fn write(path: &Path, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
    std::fs::write(path, to_bytes(tensors))
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Reads an F32-only safetensors file (what [`write`] produces) into a name-keyed map.
pub fn read(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    let raw = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    ensure!(raw.len() >= 8, "{}: shorter than 8 bytes", path.display());
    let n = u64::from_le_bytes(raw[..8].try_into().unwrap()) as usize;
    ensure!(
        8 + n <= raw.len(),
        "{}: header length {n} exceeds file size",
        path.display()
    );
    let header: Map<String, Value> = serde_json::from_slice(&raw[8..8 + n])
        .with_context(|| format!("{}: header is not a JSON object", path.display()))?;
    let data = &raw[8 + n..];
    let mut out = BTreeMap::new();
    for (name, info) in header {
        if name == "__metadata__" {
            continue;
        }
        let dtype = info["dtype"].as_str().unwrap_or("?");
        if dtype != "F32" {
            bail!(
                "{}: tensor {name} has dtype {dtype}, only F32 is supported",
                path.display()
            );
        }
        let shape: Vec<usize> = serde_json::from_value(info["shape"].clone())
            .with_context(|| format!("tensor {name}: bad shape"))?;
        let offs: [usize; 2] = serde_json::from_value(info["data_offsets"].clone())
            .with_context(|| format!("tensor {name}: bad data_offsets"))?;
        let numel: usize = shape.iter().product();
        ensure!(
            offs[1] >= offs[0] && offs[1] - offs[0] == numel * 4 && offs[1] <= data.len(),
            "tensor {name}: offsets {offs:?} do not fit shape {shape:?} / data of {} bytes",
            data.len()
        );
        let values = data[offs[0]..offs[1]]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        out.insert(name, Tensor::new(shape, values));
    }
    Ok(out)
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
        let raw = std::fs::read(&p).unwrap();
        let n = u64::from_le_bytes(raw[..8].try_into().unwrap()) as usize;
        assert_eq!(n % 8, 0);
        assert_eq!(read(&p).unwrap(), ts);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
