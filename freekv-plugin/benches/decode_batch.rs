//! Batched decode on CPU: one decode step of one layer for 32 sequences at once (FreeKV's
//! speculative retrieval with correction, and dense attention over every page through the same
//! path), reported per row, side by side in one run; FreeKV with the CPU's one background
//! worker (the default there) and with two.
//!
//! `cargo bench -p freekv-plugin --bench decode_batch [-- --quick]`
//!
//! Each sequence holds a 4096-token context (Llama-3.1-8B's attention shape, bf16 KV, budget
//! 2048); steps run over 4 layers round-robin so the background selection of one layer overlaps
//! the others, as in a model. The variants are interleaved round by round, each round starting
//! with the next one.

use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use freekv_plugin::{
    AttnParams, DecodeRow, FreeKv, FreeKvConfig, KvDType, Mode, ModelShape, PrefillRow, Qkv,
};

#[allow(dead_code)]
mod inputs;
#[allow(dead_code)]
mod shapes;
use inputs::{bench_config, Rng, PAGE};
use shapes::{Shape, LLAMA};

const LAYERS: usize = 4;
const ROWS: usize = 32;
const CONTEXT: usize = 4096;
/// Distinct decode inputs, reused cyclically.
const INPUTS: usize = 4;

fn tensor(rng: &mut Rng, dims: (usize, usize, usize)) -> Tensor {
    Tensor::from_vec(rng.normals(dims.0 * dims.1 * dims.2), dims, &Device::Cpu)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap()
}

/// One configuration with its 32 sequences prefilled.
struct Variant {
    label: &'static str,
    fk: FreeKv,
    tables: Vec<Vec<u32>>,
    len: usize,
    elapsed: Duration,
    row_steps: usize,
}

fn prefill(
    shape: Shape,
    config: FreeKvConfig,
    label: &'static str,
    steps: usize,
    rng: &mut Rng,
) -> Variant {
    let pages = (CONTEXT + steps + 1).div_ceil(PAGE);
    let model = ModelShape {
        num_layers: LAYERS,
        num_q_heads: shape.q,
        num_kv_heads: shape.kv,
        head_dim: shape.d,
    };
    let fk = FreeKv::new(config, model, ROWS * pages, KvDType::BF16).unwrap();
    let tables: Vec<Vec<u32>> = (0..ROWS)
        .map(|s| ((s * pages) as u32..((s + 1) * pages) as u32).collect())
        .collect();
    let params = AttnParams::scaled(1.0 / (shape.d as f32).sqrt());
    let chunk = 1024;
    for layer in 0..LAYERS {
        for (s, table) in tables.iter().enumerate() {
            let mut done = 0;
            while done < CONTEXT {
                let k = tensor(rng, (shape.kv, chunk, shape.d))
                    .unsqueeze(0)
                    .unwrap();
                let q = tensor(rng, (shape.q, chunk, shape.d)).unsqueeze(0).unwrap();
                let row = PrefillRow {
                    seq_id: s as u64,
                    block_table: &table[..(done + chunk).div_ceil(PAGE)],
                    cached_len: done,
                    new_len: chunk,
                };
                fk.prefill(layer, &[row], Qkv::new(&q, &k, &k), &params, false)
                    .unwrap();
                done += chunk;
            }
        }
    }
    Variant {
        label,
        fk,
        tables,
        len: CONTEXT,
        elapsed: Duration::ZERO,
        row_steps: 0,
    }
}

impl Variant {
    fn run(&mut self, inputs: &[[Tensor; 3]], steps: usize, params: &AttnParams, timed: bool) {
        for _ in 0..steps {
            self.len += 1;
            let rows: Vec<DecodeRow<'_>> = self
                .tables
                .iter()
                .enumerate()
                .map(|(s, t)| DecodeRow {
                    seq_id: s as u64,
                    block_table: &t[..self.len.div_ceil(PAGE)],
                    context_len: self.len,
                })
                .collect();
            let [q, k, v] = &inputs[self.len % inputs.len()];
            let t = Instant::now();
            for layer in 0..LAYERS {
                self.fk
                    .decode(layer, &rows, Qkv::new(q, k, v), params)
                    .unwrap();
            }
            if timed {
                self.elapsed += t.elapsed();
                self.row_steps += ROWS * LAYERS;
            }
        }
    }
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (rounds, per_round, warmup) = if quick { (3, 2, 1) } else { (6, 3, 2) };
    let shape = LLAMA;
    let mut rng = Rng::new(0xBA7C4);
    let inputs: Vec<[Tensor; 3]> = (0..INPUTS)
        .map(|_| {
            [
                tensor(&mut rng, (ROWS, shape.q, shape.d)),
                tensor(&mut rng, (ROWS, shape.kv, shape.d)),
                tensor(&mut rng, (ROWS, shape.kv, shape.d)),
            ]
        })
        .collect();
    let steps = warmup + rounds * per_round;
    let params = AttnParams::scaled(1.0 / (shape.d as f32).sqrt());
    let freekv = bench_config(Mode::FreeKv);
    let two_workers = FreeKvConfig {
        workers: 2,
        ..freekv.clone()
    };
    let mut variants = vec![
        prefill(
            shape,
            freekv,
            "freekv (1 worker, the CPU's default)",
            steps,
            &mut rng,
        ),
        prefill(shape, two_workers, "freekv (2 workers)", steps, &mut rng),
        prefill(shape, bench_config(Mode::Dense), "dense", steps, &mut rng),
    ];
    for v in variants.iter_mut() {
        v.run(&inputs, warmup, &params, false);
    }
    // Each round starts with the next variant, so that no variant always runs first.
    let n = variants.len();
    for round in 0..rounds {
        for i in 0..n {
            variants[(round + i) % n].run(&inputs, per_round, &params, true);
        }
    }
    println!(
        "# decode_batch: {ROWS} sequences of ~{CONTEXT} tokens per step, {} ({LAYERS} layers round-robin, bf16 KV, page {PAGE}, budget 2048), {rounds} rounds x {per_round} steps, {} threads",
        shape.name,
        rayon::current_num_threads()
    );
    println!("| variant | per row and layer (us) | per step of 32 rows (ms) |");
    println!("|---|---:|---:|");
    for v in &variants {
        let per_row = v.elapsed.as_secs_f64() * 1e6 / v.row_steps.max(1) as f64;
        println!(
            "| {} | {per_row:.1} | {:.2} |",
            v.label,
            per_row * ROWS as f64 / 1e3
        );
    }
}
