//! Prefill attention of one layer on CPU, side by side in one run: FreeKV's tiled causal
//! kernel (what every prompt chunk runs with FreeKV on) vs the engine's CPU SDPA (what stock
//! mistral.rs runs, `mistralrs_core::attention_backend::Sdpa` with the engine's additive
//! causal mask), with GFLOP/s next to the machine's measured FMA peak.
//!
//! `cargo bench --workspace --features mistralrs-cli/freekv --bench prefill_attention [-- --quick]`
//! (the workspace's feature set, so nothing of the engine is rebuilt).
//!
//! Rows:
//! - **freekv prefill**: `FreeKv::prefill` of one layer with the output, i.e. pages written
//!   into the host tier, summaries, the attention, and the first selection;
//! - **freekv store only**: the same without the output (what the prefill costs besides the
//!   attention); the difference is the kernel's time, from which its GFLOP/s are given;
//! - **engine SDPA**: the engine's attention on the same q/k/v (f32, contiguous) and mask.
//!
//! FLOPs count 2 per multiply-add of q.k and p.v over the keys each query sees (causal), as
//! FlashAttention's papers do. The peak is an FMA loop with 12 independent 8-lane chains, on
//! one thread and on every thread of rayon's pool.

use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use freekv_plugin::{AttnParams, FreeKv, FreeKvConfig, KvDType, ModelShape, PrefillRow, Qkv};
use mistralrs_core::attention_backend::{Sdpa, SdpaParams};
use rayon::prelude::*;

mod shapes;
use shapes::{Shape, LLAMA, SMOL};

/// Reproducible values in [-1, 1) without the rand crate.
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// Median of `reps` timings of `f`, after one untimed warm-up call.
fn median(reps: usize, mut f: impl FnMut()) -> Duration {
    f();
    let mut t: Vec<Duration> = (0..reps)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed()
        })
        .collect();
    t.sort();
    t[reps / 2]
}

/// FMA throughput of one thread in GFLOP/s: 12 independent chains of 8-lane FMAs.
#[cfg(target_arch = "x86_64")]
fn fma_peak_one_thread() -> f64 {
    use std::arch::x86_64::*;
    if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
        return f64::NAN;
    }
    #[target_feature(enable = "avx2,fma")]
    unsafe fn kernel(iters: usize) -> f32 {
        let mut acc = [_mm256_set1_ps(0.0); 12];
        let a = _mm256_set1_ps(0.999_9);
        let b = _mm256_set1_ps(1e-7);
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm256_fmadd_ps(*x, a, b);
            }
        }
        let mut s = [0f32; 8];
        let mut t = acc[0];
        for x in &acc[1..] {
            t = _mm256_add_ps(t, *x);
        }
        _mm256_storeu_ps(s.as_mut_ptr(), t);
        s.iter().sum()
    }
    let iters = 20_000_000;
    let start = Instant::now();
    // SAFETY: the features were detected above.
    let sink = unsafe { kernel(iters) };
    std::hint::black_box(sink);
    (iters * 12 * 8 * 2) as f64 / start.elapsed().as_secs_f64() / 1e9
}

#[cfg(not(target_arch = "x86_64"))]
fn fma_peak_one_thread() -> f64 {
    f64::NAN
}

/// Multiply-adds of causal attention of `len` tokens.
fn causal_flops(s: Shape, len: usize) -> f64 {
    let pairs = (len * (len + 1) / 2) as f64;
    pairs * (s.q * s.d) as f64 * 2.0 * 2.0
}

struct Row {
    shape: &'static str,
    len: usize,
    freekv: Duration,
    store: Duration,
    sdpa: Option<Duration>,
    flops: f64,
}

fn bench(shape: Shape, len: usize, reps: usize, with_sdpa: bool) -> Row {
    let (q, k, v) = (
        values(shape.q * len * shape.d, 1),
        values(shape.kv * len * shape.d, 2),
        values(shape.kv * len * shape.d, 3),
    );
    let q = Tensor::from_vec(q, (1, shape.q, len, shape.d), &Device::Cpu).unwrap();
    let k = Tensor::from_vec(k, (1, shape.kv, len, shape.d), &Device::Cpu).unwrap();
    let v = Tensor::from_vec(v, (1, shape.kv, len, shape.d), &Device::Cpu).unwrap();
    let scale = 1.0 / (shape.d as f32).sqrt();

    let config = FreeKvConfig::default();
    let model = ModelShape {
        num_layers: 1,
        num_q_heads: shape.q,
        num_kv_heads: shape.kv,
        head_dim: shape.d,
    };
    let pages = len.div_ceil(config.page_size);
    let table: Vec<u32> = (0..pages as u32).collect();
    let fk = FreeKv::new(config, model, pages, KvDType::F32).unwrap();
    let params = AttnParams::scaled(scale);
    let mut id = 0;
    let mut run = |want: bool| {
        id += 1;
        let row = PrefillRow {
            seq_id: id,
            block_table: &table,
            cached_len: 0,
            new_len: len,
        };
        let out = fk
            .prefill(0, &[row], Qkv::new(&q, &k, &v), &params, want)
            .unwrap();
        std::hint::black_box(out);
        fk.free_sequence(id);
    };
    let freekv = median(reps, || run(true));
    let store = median(reps, || run(false));

    let sdpa = with_sdpa.then(|| {
        let mask: Vec<f32> = (0..len * len)
            .map(|i| {
                if i % len > i / len {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        let mask = Tensor::from_vec(mask, (len, len), &Device::Cpu).unwrap();
        let p = SdpaParams {
            n_kv_groups: shape.q / shape.kv,
            softcap: None,
            softmax_scale: scale,
            sliding_window: None,
            sinks: None,
        };
        median(reps, || {
            let out = Sdpa
                .run_attention(&q, &k, &v, Some(&mask), None, &p)
                .unwrap();
            std::hint::black_box(out.to_dtype(DType::F32).unwrap());
        })
    });
    Row {
        shape: shape.name,
        len,
        freekv,
        store,
        sdpa,
        flops: causal_flops(shape, len),
    }
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let threads = rayon::current_num_threads();
    let one = fma_peak_one_thread();
    let all: f64 = (0..threads)
        .into_par_iter()
        .map(|_| fma_peak_one_thread())
        .sum();
    println!("FMA peak: {one:.1} GFLOP/s on one thread, {all:.1} GFLOP/s on {threads} threads\n");

    // (shape, prompt length, repetitions, engine SDPA too): SDPA visits every (query, key)
    // pair, so its long rows take tens of seconds each.
    let cases: Vec<(Shape, usize, usize, bool)> = if quick {
        vec![(SMOL, 1024, 3, true), (SMOL, 4096, 3, false)]
    } else {
        vec![
            (SMOL, 1024, 5, true),
            (SMOL, 2048, 3, true),
            (SMOL, 4096, 3, true),
            (SMOL, 7680, 3, false),
            (LLAMA, 1024, 3, true),
            (LLAMA, 4096, 3, false),
        ]
    };
    println!(
        "| shape | prompt | freekv prefill (ms) | store only (ms) | attention (ms) | attention GFLOP/s | % of {threads}-thread peak | engine SDPA (ms) | SDPA GFLOP/s | SDPA / freekv prefill |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (shape, len, reps, with_sdpa) in cases {
        let r = bench(shape, len, reps, with_sdpa);
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let attn = r.freekv.saturating_sub(r.store);
        let gflops = r.flops / attn.as_secs_f64().max(1e-9) / 1e9;
        let (sdpa_ms, sdpa_gf, ratio) = match r.sdpa {
            Some(s) => (
                format!("{:.1}", ms(s)),
                format!("{:.1}", r.flops / s.as_secs_f64() / 1e9),
                format!("**{:.1}x**", s.as_secs_f64() / r.freekv.as_secs_f64()),
            ),
            None => ("-".into(), "-".into(), "-".into()),
        };
        println!(
            "| {} | {} | {:.1} | {:.1} | {:.1} | {gflops:.1} | {:.0}% | {sdpa_ms} | {sdpa_gf} | {ratio} |",
            r.shape,
            r.len,
            ms(r.freekv),
            ms(r.store),
            ms(attn),
            100.0 * gflops / all,
        );
    }
}
