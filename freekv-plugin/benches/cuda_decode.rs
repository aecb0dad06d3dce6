//! Decode on a CUDA device with the backend the engine runs (`FreeKv::new_on` a CUDA device:
//! the offload design over `CudaOps`), Llama-3.1-8B layer shape (32 query heads, 8 KV heads,
//! d 128, bf16, page 32) at 32K / 64K / 128K context, budget B = 2048 (sink 512, window 512),
//! `FREEKV_BENCH_LAYERS` layers (default 8) of one sequence, measured side by side in one run:
//!
//! - `dense-gpu`: every key and value on the GPU, attention over the whole context with candle's
//!   matmul and softmax (the baseline a GPU with enough memory runs);
//! - `dense-freekv`: FreeKV in mode `dense` (every page on the device, FreeKV's decode kernels):
//!   what the kernels cost against candle's, before any retrieval;
//! - `sync`: FreeKV's synchronous retrieval (select with q_i, recall, attend; all blocking);
//! - `speculative`: speculative retrieval without correction;
//! - `freekv`: speculative retrieval with correction (tau 0.9), with the GPU's default two
//!   background workers; `freekv-1-worker`: the same with one.
//!
//! Queries drift (consecutive cosine about 0.93 per query head), as in `decode_step`. Reported as
//! one JSON object per line (stdout and `$FREEKV_BENCH_OUT`): ms per step (all layers), the
//! ratios to dense-gpu and to sync, correction rate, pages recalled and blocking time per
//! layer-step, device KV bytes per sequence against dense, whether the host tier is page-locked
//! (`pinned`); then, last and non-fatal, the recall pipeline's bandwidth on 16 KiB chunks
//! against a measured host-to-device peak.
//!
//! Fairness: cudarc's per-buffer event tracking is off (with it on, candle's dense baseline is
//! bound by the CPU recording events); every variant attends the same inputs; with
//! `FREEKV_BENCH_WEIGHTS=1` each layer also multiplies a token by a Llama-8B layer's worth of
//! weights (4096 x 53248 bf16, 436 MB), the work a real model gives the recall to hide behind.
//!
//! `cargo bench -p freekv-plugin --features cuda --bench cuda_decode` (or the binary that
//! `kernels/build-device.sh` builds). Env: FREEKV_BENCH_LAYERS, FREEKV_BENCH_CONTEXTS (e.g.
//! "32768,65536"), FREEKV_BENCH_STEPS, FREEKV_BENCH_WEIGHTS. Without a CUDA device it says so and
//! exits 0 (with FREEKV_REQUIRE_CUDA=1: fails).

use std::io::Write;
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use cudarc::driver::{result, sys, CudaContext};
use freekv_plugin::cuda::device_tier::{CudaSlots, TierShape};
use freekv_plugin::cuda::kernels::{Kernels, RecallJob};
use freekv_plugin::cuda::mem::{DeviceBuffer, HostRegistration, PinnedBuffer};
use freekv_plugin::cuda::module;
use freekv_plugin::cuda::recall::{RawEvent, RecallPipeline};
use freekv_plugin::cuda::source::{KernelConfig, KernelDtype};
use freekv_plugin::{AttnParams, DecodeRow, FreeKv, FreeKvConfig, KvDType, Mode, ModelShape, Qkv};

mod inputs;
#[allow(dead_code)] // the CPU benchmarks' other shape
mod shapes;
use inputs::{bench_config, make_prompt, make_steps, prefill_sequence, Rng, Steps, BUDGET, PAGE};
use shapes::LLAMA;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Lines to stdout and, when `$FREEKV_BENCH_OUT` is set, to that file.
struct Out(Option<std::fs::File>);

impl Out {
    fn emit(&mut self, line: String) {
        println!("{line}");
        if let Some(f) = &mut self.0 {
            let _ = writeln!(f, "{line}");
        }
    }
}

/// Timing of one variant at one context.
struct Timed {
    ms_per_step: f64,
    counters: Option<freekv_plugin::LayerCounters>,
    device_kv_bytes: usize,
    /// Whether every layer's host tier was page-locked (None: no host tier).
    pinned: Option<bool>,
}

/// The stand-in for a layer's weight work: one token times the weights, on candle's stream.
fn weight_work(w: &Workload) -> anyhow::Result<()> {
    if let Some((x, weights)) = w.weights {
        std::hint::black_box(x.matmul(weights)?);
    }
    Ok(())
}

/// Waits for all work queued on `device` (candle's stream).
fn sync(device: &Device) -> anyhow::Result<()> {
    device.synchronize()?;
    Ok(())
}

/// Dense attention over the whole context on the GPU with candle's ops, per layer: q `(1, 8, 4,
/// d)` against K/V `(1, 8, ctx + steps, d)` (GQA without copying K/V).
fn dense_gpu(w: &Workload) -> anyhow::Result<Timed> {
    let Workload {
        device,
        layers,
        ctx,
        steps,
        n,
        ..
    } = *w;
    let s = LLAMA;
    let group = s.q / s.kv;
    let scale = 1.0 / (s.d as f64).sqrt();
    let kv: Vec<(Tensor, Tensor)> = (0..layers)
        .map(|_| -> anyhow::Result<(Tensor, Tensor)> {
            let k = Tensor::randn(0f32, 1.0, (1, s.kv, ctx, s.d), device)?.to_dtype(DType::BF16)?;
            let v = Tensor::randn(0f32, 1.0, (1, s.kv, ctx, s.d), device)?.to_dtype(DType::BF16)?;
            Ok((k, v))
        })
        .collect::<anyhow::Result<_>>()?;
    let attend = |i: usize, l: usize| -> anyhow::Result<Tensor> {
        let (k, v) = &kv[l];
        let q = steps.q[i].reshape((1, s.kv, group, s.d))?;
        let scores = (q.matmul(&k.t()?)? * scale)?;
        let p = softmax_last(&scores)?;
        Ok(p.matmul(v)?)
    };
    let per_layer = steps.q.len() / layers;
    for l in 0..layers {
        attend(l, l)?;
    }
    sync(device)?;
    let t = Instant::now();
    for step in 0..n {
        for l in 0..layers {
            weight_work(w)?;
            std::hint::black_box(attend((step % per_layer) * layers + l, l)?);
        }
    }
    sync(device)?;
    Ok(Timed {
        ms_per_step: t.elapsed().as_secs_f64() * 1e3 / n as f64,
        counters: None,
        device_kv_bytes: layers * 2 * ctx * s.kv * s.d * 2,
        pinned: None,
    })
}

/// Softmax over the last dimension in f32 (candle-core has no fused one without candle-nn).
fn softmax_last(x: &Tensor) -> anyhow::Result<Tensor> {
    let dt = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let m = x.max_keepdim(candle_core::D::Minus1)?;
    let e = x.broadcast_sub(&m)?.exp()?;
    let z = e.sum_keepdim(candle_core::D::Minus1)?;
    Ok(e.broadcast_div(&z)?.to_dtype(dt)?)
}

/// One context's inputs, the same for every variant.
#[derive(Clone, Copy)]
struct Workload<'a> {
    device: &'a Device,
    layers: usize,
    /// Prompt tokens.
    ctx: usize,
    prompt: &'a inputs::Prompt,
    /// Each decode step's q, k and v per layer.
    steps: &'a Steps,
    /// Timed decode steps.
    n: usize,
    /// Untimed decode steps before them (FreeKV only).
    warmup: usize,
    /// The stand-in weight work per layer: a token `(1, 4096)` and the weights.
    weights: Option<(&'a Tensor, &'a Tensor)>,
}

/// One FreeKV mode through `FreeKv::new_on`: prefill (not timed), then `n` timed decode steps
/// over every layer after a warm-up.
fn freekv(w: &Workload, mode: Mode, workers: usize) -> anyhow::Result<Timed> {
    let Workload {
        device,
        layers,
        ctx,
        prompt,
        steps,
        n,
        warmup,
        ..
    } = *w;
    let s = LLAMA;
    let shape = ModelShape {
        num_layers: layers,
        num_q_heads: s.q,
        num_kv_heads: s.kv,
        head_dim: s.d,
    };
    let pages = (ctx + warmup + n).div_ceil(PAGE) + 1;
    let config = FreeKvConfig {
        workers,
        ..bench_config(mode)
    };
    let fk = FreeKv::new_on(device, config, shape, pages, KvDType::BF16)?;
    let table: Vec<u32> = (0..pages as u32).collect();
    prefill_sequence(&fk, s, layers, prompt, ctx, &table, PAGE);
    let params = AttnParams::scaled(1.0 / (s.d as f32).sqrt());
    let per_layer = steps.q.len() / layers;
    let mut len = ctx;
    let mut run = |count: usize, first: usize| -> anyhow::Result<()> {
        for step in first..first + count {
            len += 1;
            let row = DecodeRow {
                seq_id: 1,
                block_table: &table[..len.div_ceil(PAGE)],
                context_len: len,
            };
            for l in 0..layers {
                weight_work(w)?;
                let i = (step % per_layer) * layers + l;
                let out = fk.decode(
                    l,
                    &[row],
                    Qkv::new(&steps.q[i], &steps.k[i], &steps.v[i]),
                    &params,
                )?;
                std::hint::black_box(out);
            }
        }
        Ok(())
    };
    run(warmup, 0)?;
    fk.join_background()?;
    let base = fk.counters().total;
    sync(device)?;
    let t = Instant::now();
    run(n, warmup)?;
    sync(device)?;
    let ms = t.elapsed().as_secs_f64() * 1e3 / n as f64;
    fk.join_background()?;
    Ok(Timed {
        ms_per_step: ms,
        counters: Some(fk.counters().total.since(&base)),
        device_kv_bytes: fk.device_tier_bytes_per_sequence(),
        pinned: Some(fk.unpinned_host_tiers() == 0),
    })
}

fn main() -> anyhow::Result<()> {
    let mut out = Out(std::env::var("FREEKV_BENCH_OUT")
        .ok()
        .and_then(|p| std::fs::File::create(p).ok()));
    let device = match cudarc::driver::CudaContext::device_count() {
        Ok(n) if n > 0 => Device::new_cuda(0)?,
        other => {
            out.emit(format!("{{\"skipped\":\"no CUDA device ({other:?})\"}}"));
            // The device script runs the bench with FREEKV_REQUIRE_CUDA=1: a skip is a failure.
            anyhow::ensure!(
                std::env::var("FREEKV_REQUIRE_CUDA").as_deref() != Ok("1"),
                "the bench needs the GPU (FREEKV_REQUIRE_CUDA=1): no CUDA device ({other:?})"
            );
            return Ok(());
        }
    };
    // Off before any buffer exists (it applies to buffers created later): candle's stream
    // orders its own work, and FreeKV orders its streams with its own events.
    let Device::Cuda(cuda) = &device else {
        anyhow::bail!("not a CUDA device")
    };
    // SAFETY: every tensor of the bench is used on candle's stream only; FreeKV's streams touch
    // raw device memory, ordered by FreeKV's own events.
    unsafe { cuda.cuda_stream().context().disable_event_tracking() };
    let layers = env_usize("FREEKV_BENCH_LAYERS", 8);
    let n = env_usize("FREEKV_BENCH_STEPS", 32);
    let warmup = 4;
    let contexts: Vec<usize> = std::env::var("FREEKV_BENCH_CONTEXTS")
        .ok()
        .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![32768, 65536, 131072]);
    let with_weights = env_usize("FREEKV_BENCH_WEIGHTS", 0) == 1;
    let weights = if with_weights {
        let x = Tensor::ones((1, 4096), DType::BF16, &device)?;
        let w = Tensor::zeros((4096, 53248), DType::BF16, &device)?;
        Some((x, w))
    } else {
        None
    };
    out.emit(format!(
        "{{\"shape\":\"{}\",\"budget\":{BUDGET},\"page\":{PAGE},\"layers\":{layers},\"steps\":{n},\"contexts\":{contexts:?},\"event_tracking\":false,\"weights_per_layer\":{with_weights}}}",
        LLAMA.name
    ));
    for &ctx in &contexts {
        let mut rng = Rng::new(0xC0DA + ctx as u64);
        let steps = make_steps(LLAMA, layers, warmup + n, &device, &mut rng);
        let prompt = make_prompt(LLAMA, ctx, &device, &mut rng);
        let w = Workload {
            device: &device,
            layers,
            ctx,
            prompt: &prompt,
            steps: &steps,
            n,
            warmup,
            weights: weights.as_ref().map(|(x, w)| (x, w)),
        };
        let dense = dense_gpu(&w)?;
        let mut rows = vec![("dense-gpu", dense)];
        // Workers 0: the device's default (two).
        for (label, mode, workers) in [
            ("dense-freekv", Mode::Dense, 0),
            ("sync", Mode::Sync, 0),
            ("speculative", Mode::Speculative, 0),
            ("freekv", Mode::FreeKv, 0),
            ("freekv-1-worker", Mode::FreeKv, 1),
        ] {
            rows.push((label, freekv(&w, mode, workers)?));
        }
        let dense_ms = rows[0].1.ms_per_step;
        let dense_bytes = rows[0].1.device_kv_bytes;
        let sync_ms = rows[2].1.ms_per_step;
        for (label, r) in &rows {
            let c = r.counters.unwrap_or_default();
            let layer_steps = (n * layers).max(1) as f64;
            out.emit(format!(
                "{{\"context\":{ctx},\"layers\":{layers},\"variant\":\"{label}\",\"ms_per_step\":{:.3},\"vs_dense_gpu\":{:.3},\"speedup_vs_sync\":{:.3},\"correction_rate\":{:.4},\"pages_recalled_per_layer_step\":{:.2},\"blocking_us_per_layer_step\":{:.1},\"wait_us_per_layer_step\":{:.1},\"device_kv_bytes_per_sequence\":{},\"vs_dense_kv_bytes\":{:.4},\"pinned\":{}}}",
                r.ms_per_step,
                r.ms_per_step / dense_ms,
                sync_ms / r.ms_per_step,
                c.correction_rate(),
                c.pages_recalled as f64 / layer_steps,
                c.blocking_ns as f64 / 1e3 / layer_steps,
                c.wait_ns as f64 / 1e3 / layer_steps,
                r.device_kv_bytes,
                r.device_kv_bytes as f64 / dense_bytes as f64,
                r.pinned.map_or("null".to_string(), |p| p.to_string()),
            ));
        }
    }
    // Last: a failure here (pinning refused, say) costs no figure above.
    if let Err(e) = bandwidth(&device, &mut out) {
        out.emit(serde_json::json!({ "bandwidth_error": format!("{e:#}") }).to_string());
    }
    Ok(())
}

/// Host->device peak (one large pinned copy) vs the recall pipeline moving 4096 random 16 KiB
/// chunks of a registered (page-locked) host region.
fn bandwidth(device: &Device, out: &mut Out) -> anyhow::Result<()> {
    let Device::Cuda(cuda) = device else {
        anyhow::bail!("not a CUDA device")
    };
    let ctx: Arc<CudaContext> = cuda.cuda_stream().context().clone();
    ctx.bind_to_thread()?;
    let stream = ctx.new_stream()?;
    let bytes = 512 << 20;
    let src = PinnedBuffer::new(&ctx, bytes)?;
    let dst = DeviceBuffer::new(&ctx, bytes)?;
    let timing = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
    let (e0, e1) = (ctx.new_event(timing)?, ctx.new_event(timing)?);
    let mut peak = 0f64;
    for _ in 0..3 {
        e0.record(&stream)?;
        // SAFETY: both buffers are `bytes` long and outlive the synchronize below.
        unsafe { result::memcpy_htod_async(dst.ptr(), src.as_slice(), stream.cu_stream()) }?;
        e1.record(&stream)?;
        e1.synchronize()?;
        peak = peak.max(bytes as f64 / (e0.elapsed_ms(&e1)? as f64 * 1e-3) / 1e9);
    }
    let s = LLAMA;
    let chunk_bytes = 2 * PAGE * s.d * 2;
    let kcfg = KernelConfig {
        dtype: KernelDtype::Bf16,
        head_dim: s.d,
        page_size: PAGE,
        group: s.q / s.kv,
    };
    let kernels = Arc::new(Kernels::new(module::load(&ctx, kcfg)?));
    let pipe = RecallPipeline::new(&ctx, kernels, chunk_bytes, 256, s.kv)?;
    // 1 GiB of host pages, allocated as the host tier is (a plain allocation) and registered.
    let host = vec![0u16; (1usize << 30) / 2];
    let _pin = HostRegistration::new(&ctx, host.as_ptr() as *const u8, host.len() * 2)?;
    let n_chunks_host = host.len() * 2 / chunk_bytes;
    let n_slots = BUDGET / PAGE;
    let shape = TierShape {
        n_kv: s.kv,
        group: s.q / s.kv,
        head_dim: s.d,
        page_size: PAGE,
        n_slots,
        elem_bytes: 2,
    };
    let tier = CudaSlots::new(&ctx, shape)?;
    let mut rng = Rng::new(12345);
    let (mut best, mut calls) = (0f64, 0);
    for _ in 0..3 {
        let jobs: Vec<RecallJob> = (0..4096)
            .map(|i| {
                let c = (rng.next_u64() as usize) % n_chunks_host;
                RecallJob {
                    src: host.as_ptr() as u64 + (c * chunk_bytes) as u64,
                    slots: tier.slots.ptr(),
                    slot: (i % n_slots) as i32,
                    head: ((rng.next_u64() as usize) % s.kv) as i32,
                }
            })
            .collect();
        let done = Arc::new(RawEvent::new(&ctx)?);
        ctx.synchronize()?;
        let t0 = Instant::now();
        let st = pipe
            .submit(jobs, vec![], vec![done.clone()])
            .wait_enqueued()?;
        done.synchronize()?;
        calls = st.copy_calls;
        best = best.max((4096 * chunk_bytes) as f64 / t0.elapsed().as_secs_f64() / 1e9);
    }
    out.emit(format!(
        "{{\"recall_bandwidth\":{{\"chunk_bytes\":{chunk_bytes},\"chunks\":4096,\"copy_calls\":{calls},\"gb_per_s\":{best:.2},\"h2d_peak_gb_per_s\":{peak:.2},\"fraction_of_peak\":{:.3}}}}}",
        best / peak
    ));
    Ok(())
}
