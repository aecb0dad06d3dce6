//! Reproducible decode inputs shared by the decode benchmarks: drifting queries, random keys
//! and values per (step, layer), and a prompt, on any device.

use candle_core::{DType, Device, Tensor};
use freekv_plugin::{AttnParams, FreeKv, FreeKvConfig, Mode, PrefillRow, Qkv};

use crate::shapes::Shape;

/// Page size and budget of the decode benchmarks: the spec's defaults.
pub const PAGE: usize = 32;
pub const BUDGET: usize = 2048;

/// The decode benchmarks' FreeKV configuration in `mode`: budget 2048 = sink 512 + window
/// 512 + 32 selected pages, tau 0.9, every layer sparse.
pub fn bench_config(mode: Mode) -> FreeKvConfig {
    FreeKvConfig {
        page_size: PAGE,
        budget: BUDGET,
        sink: 512,
        window: 512,
        tau: 0.9,
        dense_layers: vec![],
        mode,
        ..Default::default()
    }
}

/// The tests' seeded generator (ChaCha8), shared with the benchmarks.
#[allow(dead_code)]
#[path = "../../tests/core/rng.rs"]
mod rng;
pub use rng::Rng;

/// The decode inputs of every (step, layer), shared by all variants.
pub struct Steps {
    pub q: Vec<Tensor>,
    pub k: Vec<Tensor>,
    pub v: Vec<Tensor>,
}

/// Drifting queries: per query head, `q_i = c q_{i-1} + sqrt(1 - c^2) n` with the noise `n`
/// orthogonal to `q_{i-1}` and `c` drawn per step around 0.93 (sometimes lower).
pub fn make_steps(
    shape: Shape,
    layers: usize,
    steps: usize,
    device: &Device,
    rng: &mut Rng,
) -> Steps {
    let d = shape.d;
    let mut prev: Vec<Vec<Vec<f32>>> = (0..layers)
        .map(|_| (0..shape.q).map(|_| rng.normals(d)).collect())
        .collect();
    let (mut qs, mut ks, mut vs) = (vec![], vec![], vec![]);
    for _ in 0..steps {
        for layer_prev in prev.iter_mut() {
            let mut flat = Vec::with_capacity(shape.q * d);
            for p in layer_prev.iter_mut() {
                let c = (0.93 + 0.06 * rng.normal() as f64).clamp(0.5, 0.999);
                let n = rng.normals(d);
                let pn: f64 = p.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
                let dot: f64 = p.iter().zip(&n).map(|(a, b)| *a as f64 * *b as f64).sum();
                let orth: Vec<f64> = n
                    .iter()
                    .zip(p.iter())
                    .map(|(x, y)| *x as f64 - dot / (pn * pn) * *y as f64)
                    .collect();
                let on: f64 = orth.iter().map(|x| x * x).sum::<f64>().sqrt();
                let s = (1.0 - c * c).sqrt();
                for (x, o) in p.iter_mut().zip(&orth) {
                    *x = (c * *x as f64 + s * o / on * pn) as f32;
                }
                flat.extend_from_slice(p);
            }
            let t = |v: Vec<f32>, h: usize| {
                Tensor::from_vec(v, (1, h, d), &Device::Cpu)
                    .unwrap()
                    .to_dtype(DType::BF16)
                    .unwrap()
                    .to_device(device)
                    .unwrap()
            };
            qs.push(t(flat, shape.q));
            ks.push(t(rng.normals(shape.kv * d), shape.kv));
            vs.push(t(rng.normals(shape.kv * d), shape.kv));
        }
    }
    Steps {
        q: qs,
        k: ks,
        v: vs,
    }
}

/// The prompt's keys (used as values too) and last query, shared by every variant and layer.
pub struct Prompt {
    pub k: Tensor,
    pub last_q: Tensor,
}

pub fn make_prompt(shape: Shape, ctx: usize, device: &Device, rng: &mut Rng) -> Prompt {
    let k = Tensor::from_vec(
        rng.normals(shape.kv * ctx * shape.d),
        (1, shape.kv, ctx, shape.d),
        &Device::Cpu,
    )
    .unwrap()
    .to_dtype(DType::BF16)
    .unwrap();
    let last_q = Tensor::from_vec(
        rng.normals(shape.q * shape.d),
        (1, shape.q, 1, shape.d),
        &Device::Cpu,
    )
    .unwrap()
    .to_dtype(DType::BF16)
    .unwrap();
    Prompt {
        k: k.to_device(device).unwrap(),
        last_q: last_q.to_device(device).unwrap(),
    }
}

/// Prefills sequence 1 of `fk` on every layer with the prompt's first `ctx` tokens (keys used as
/// values) in chunks of 4096 (cached_len grows), no output; the last query is the prompt's.
pub fn prefill_sequence(
    fk: &FreeKv,
    shape: Shape,
    layers: usize,
    prompt: &Prompt,
    ctx: usize,
    table: &[u32],
    page: usize,
) {
    let chunk = 4096.min(ctx);
    let params = AttnParams::scaled(1.0 / (shape.d as f32).sqrt());
    let device = prompt.k.device();
    for layer in 0..layers {
        let mut done = 0;
        while done < ctx {
            let n = chunk.min(ctx - done);
            let k = prompt.k.narrow(2, done, n).unwrap();
            let q = Tensor::zeros((1, shape.q, n, shape.d), DType::BF16, device).unwrap();
            let q = if done + n == ctx {
                // A real last query.
                Tensor::cat(&[q.narrow(2, 0, n - 1).unwrap(), prompt.last_q.clone()], 2).unwrap()
            } else {
                q
            };
            let row = PrefillRow {
                seq_id: 1,
                block_table: &table[..(done + n).div_ceil(page)],
                cached_len: done,
                new_len: n,
            };
            fk.prefill(layer, &[row], Qkv::new(&q, &k, &k), &params, false)
                .unwrap();
            done += n;
        }
    }
}
