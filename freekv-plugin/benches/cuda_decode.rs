//! Decode attention per step for the Llama-3.1-8B layer shape (32 query heads, 8 KV heads, d 128,
//! bf16, page 32) at 32K / 64K / 128K context with budget B = 2048 (sink 512, window 512, 32
//! selected pages), over `FREEKV_BENCH_LAYERS` layers (default 8) of one sequence:
//!
//! - dense: all KV on the GPU, attention over the whole context (the same decode kernel);
//! - sync recall: select with q_i, recall the missing pages from pinned host memory, then attend,
//!   all on the critical path;
//! - FreeKV: attend over the pages recalled during the previous step, then select with q_i and
//!   recall off the critical path (copy streams + worker thread), without and with correction
//!   (tau 0.9: per layer a correction check; flagged heads re-select and recall before attention).
//!
//! Queries drift like decode queries do (consecutive cosine about 0.9). Reported, as ratios from
//! one run: ms per step, speedups, pages recalled per step, correction rate; the recall bandwidth
//! of the pipeline (both recall engines) against a measured host-to-device copy peak; and device KV
//! bytes per sequence. Output: one JSON object per line on stdout and in $FREEKV_BENCH_OUT.
//!
//! Env: FREEKV_BENCH_LAYERS, FREEKV_BENCH_CONTEXTS (e.g. "32768,65536"), FREEKV_BENCH_STEPS.

#![allow(clippy::needless_range_loop)] // per-layer tables indexed in step with the layer loop

use std::io::Write;
use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::{result, sys, CudaContext};
use freekv_plugin::cuda::device_tier::{LayerTier, TierShape};
use freekv_plugin::cuda::kernels::{KernelPooling, Kernels, RecallJob, SeqDesc, SummaryMode};
use freekv_plugin::cuda::mem::{DeviceBuffer, PinnedBuffer};
use freekv_plugin::cuda::module;
use freekv_plugin::cuda::pinned::{HostLayout, PinnedHostTier};
use freekv_plugin::cuda::recall::{ChunkCopy, RawEvent, RecallMode, RecallPipeline};
use freekv_plugin::cuda::source::{KernelConfig, KernelDtype};

const N_KV: usize = 8;
const GROUP: usize = 4;
const N_Q: usize = N_KV * GROUP;
const D: usize = 128;
const P: usize = 32;
const BUDGET: usize = 2048;
const SINK_PAGES: usize = 512 / P;
const WIN_PAGES: usize = 512 / P;
const N_SLOTS: usize = BUDGET / P;
const N_SEL: usize = N_SLOTS - SINK_PAGES - WIN_PAGES;
const TAU: f32 = 0.9;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn f(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

fn bf(x: f32) -> u16 {
    half::bf16::from_f32(x).to_bits()
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Out(Option<std::fs::File>);
impl Out {
    fn emit(&mut self, line: String) {
        println!("{line}");
        if let Some(f) = &mut self.0 {
            let _ = writeln!(f, "{line}");
        }
    }
}

/// Everything of one context length.
struct Setup {
    ctx_len: usize,
    n_pages: usize,
    layers: usize,
    host: PinnedHostTier,
    dense: Vec<LayerTier>,
    tiers: Vec<LayerTier>,
    /// Queries of every step and layer: [steps + 1][layers][N_Q][D] bf16.
    queries: DeviceBuffer,
}

impl Setup {
    fn q_ptr(&self, step: usize, layer: usize) -> u64 {
        self.queries.ptr() + (((step * self.layers + layer) * N_Q * D) * 2) as u64
    }
    fn cand(&self) -> (usize, usize) {
        (SINK_PAGES, self.n_pages - SINK_PAGES - WIN_PAGES)
    }
}

struct Bench {
    ctx: Arc<CudaContext>,
    k: Arc<Kernels>,
    pipe: RecallPipeline,
    compute: Arc<cudarc::driver::CudaStream>,
    select: Arc<cudarc::driver::CudaStream>,
    descs: DeviceBuffer,
    descs_host: PinnedBuffer,
    raw: DeviceBuffer,
    pooled: DeviceBuffer,
    counts: DeviceBuffer,
    lists: DeviceBuffer,
    lists_host: PinnedBuffer,
    flags: DeviceBuffer,
    cos: DeviceBuffer,
    flags_host: PinnedBuffer,
    part_o: DeviceBuffer,
    part_ml: DeviceBuffer,
    out: DeviceBuffer,
    sms: usize,
    /// Row capacity of raw/pooled; each holds two sets (compute stream, select stream).
    max_pages: usize,
}

fn main() -> anyhow::Result<()> {
    match CudaContext::device_count() {
        Ok(n) if n > 0 => {}
        other => {
            println!("SKIPPED cuda_decode: no CUDA device ({other:?})");
            return Ok(());
        }
    }
    let mut out = Out(std::env::var_os("FREEKV_BENCH_OUT")
        .map(|p| std::fs::File::create(p).expect("FREEKV_BENCH_OUT is writable")));
    let ctx = CudaContext::new(0)?;
    let layers = env_usize("FREEKV_BENCH_LAYERS", 8);
    let steps = env_usize("FREEKV_BENCH_STEPS", 20);
    let contexts: Vec<usize> = std::env::var("FREEKV_BENCH_CONTEXTS")
        .ok()
        .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![32768, 65536, 131072]);
    let cfg = KernelConfig {
        dtype: KernelDtype::Bf16,
        head_dim: D,
        page_size: P,
        group: GROUP,
    };
    let k = Arc::new(Kernels::new(module::load(&ctx, cfg)?));
    let layout = HostLayout {
        n_layers: layers,
        n_kv: N_KV,
        head_dim: D,
        page_size: P,
        elem_bytes: 2,
    };
    let max_pages = contexts.iter().max().unwrap() / P;
    let sms =
        ctx.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as usize;
    let n_chunks_max = max_pages.div_ceil(2);
    let b = Bench {
        ctx: ctx.clone(),
        k: k.clone(),
        pipe: RecallPipeline::new(&ctx, k.clone(), layout.chunk_bytes(), 64, N_KV)?,
        compute: ctx.new_stream()?,
        select: ctx.new_stream()?,
        descs: DeviceBuffer::new(&ctx, 128 * layers)?,
        descs_host: PinnedBuffer::new(&ctx, 128 * layers)?,
        raw: DeviceBuffer::new(&ctx, 2 * N_Q * max_pages * 4)?,
        pooled: DeviceBuffer::new(&ctx, 2 * N_KV * max_pages * 4)?,
        max_pages,
        counts: DeviceBuffer::new(&ctx, layers * N_KV * 4)?,
        lists: DeviceBuffer::new(&ctx, layers * N_KV * N_SEL * 8)?,
        lists_host: PinnedBuffer::new(&ctx, layers * N_KV * (N_SEL * 8 + 4))?,
        flags: DeviceBuffer::new(&ctx, N_KV * 4)?,
        cos: DeviceBuffer::new(&ctx, N_KV * 4)?,
        flags_host: PinnedBuffer::new(&ctx, N_KV * 4)?,
        part_o: DeviceBuffer::new(&ctx, N_Q * n_chunks_max * D * 4)?,
        part_ml: DeviceBuffer::new(&ctx, N_Q * n_chunks_max * 2 * 4)?,
        out: DeviceBuffer::new(&ctx, N_Q * D * 2)?,
        sms,
    };
    bandwidth(&b, &mut out, layout)?;
    for &ctx_len in &contexts {
        let t0 = Instant::now();
        let setup = build(&b, ctx_len, layers, steps, layout)?;
        eprintln!("setup {ctx_len}: {:.1} s", t0.elapsed().as_secs_f64());
        let dense = run_dense(&b, &setup, steps)?;
        let sync = run_sparse(&b, &setup, steps, Mode::Sync)?;
        let spec = run_sparse(&b, &setup, steps, Mode::Speculative)?;
        let corr = run_sparse(&b, &setup, steps, Mode::Corrected)?;
        let (kv, other) = setup
            .tiers
            .iter()
            .map(LayerTier::device_bytes)
            .fold((0, 0), |a, x| (a.0 + x.0, a.1 + x.1));
        let dense_kv = setup.n_pages * layout.page_bytes() * layers;
        out.emit(format!(
            "{{\"context\":{ctx_len},\"layers\":{layers},\"steps\":{steps},\"ms_per_step\":{{\"dense\":{:.4},\"sync_recall\":{:.4},\"freekv\":{:.4},\"freekv_corr\":{:.4}}},\
\"freekv_vs_dense\":{:.3},\"corr_vs_dense\":{:.3},\"speedup_vs_sync\":{:.2},\"corr_speedup_vs_sync\":{:.2},\
\"pages_recalled_per_step\":{{\"sync\":{:.1},\"freekv\":{:.1},\"freekv_corr\":{:.1}}},\"correction_rate\":{:.3},\
\"device_kv_bytes_per_seq\":{{\"freekv_slots\":{kv},\"freekv_other\":{other},\"dense\":{dense_kv},\"ratio\":{:.4}}}}}",
            dense.ms, sync.ms, spec.ms, corr.ms,
            spec.ms / dense.ms, corr.ms / dense.ms, sync.ms / spec.ms, sync.ms / corr.ms,
            sync.pages, spec.pages, corr.pages, corr.corr_rate,
            (kv + other) as f64 / dense_kv as f64
        ));
    }
    Ok(())
}

/// Host->device peak (one large pinned copy) vs the recall pipeline on 16 KiB chunks.
fn bandwidth(b: &Bench, out: &mut Out, layout: HostLayout) -> anyhow::Result<()> {
    let bytes = 512 << 20;
    let src = PinnedBuffer::new(&b.ctx, bytes)?;
    let dst = DeviceBuffer::new(&b.ctx, bytes)?;
    let s = b.compute.cu_stream();
    let timing = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
    let (e0, e1) = (b.ctx.new_event(timing)?, b.ctx.new_event(timing)?);
    let mut peak = 0f64;
    for _ in 0..3 {
        e0.record(&b.compute)?;
        // SAFETY: both buffers are `bytes` long and outlive the synchronize below.
        unsafe { result::memcpy_htod_async(dst.ptr(), src.as_slice(), s) }?;
        e1.record(&b.compute)?;
        e1.synchronize()?;
        peak = peak.max(bytes as f64 / (e0.elapsed_ms(&e1)? as f64 * 1e-3) / 1e9);
    }
    // Recall: random (page, head) chunks of a 2 GiB host region into 64-slot layer tiers.
    let n_blocks = (2usize << 30) / layout.page_bytes() / layout.n_layers;
    let host = PinnedHostTier::new(&b.ctx, layout, n_blocks.max(1))?;
    let shape = TierShape {
        n_kv: N_KV,
        group: GROUP,
        head_dim: D,
        page_size: P,
        n_slots: N_SLOTS,
        sel_slot0: SINK_PAGES,
        n_sel: N_SEL,
        elem_bytes: 2,
    };
    let tier = LayerTier::new(&b.ctx, shape, 1)?;
    let mut rng = Rng(12345);
    for mode in [RecallMode::CopyEngine, RecallMode::Direct] {
        let mut best = 0f64;
        let mut calls = 0;
        for _ in 0..3 {
            let chunks: Vec<ChunkCopy> = (0..4096)
                .map(|i| {
                    let blk = (rng.next() as usize) % host.n_blocks;
                    let head = (rng.next() as usize) % N_KV;
                    ChunkCopy {
                        host: host.chunk_ptr(blk, (i / 7) % layout.n_layers, head),
                        slots: tier.slots.ptr(),
                        slot_len: tier.slot_len.ptr(),
                        slot: (i % N_SLOTS) as i32,
                        head: head as i32,
                    }
                })
                .collect();
            let n = chunks.len();
            let done = Arc::new(RawEvent::new(&b.ctx)?);
            b.ctx.synchronize()?;
            let t0 = Instant::now();
            let st = b
                .pipe
                .submit(chunks, mode, None, done.clone())
                .wait_enqueued()?;
            done.synchronize()?;
            let dt = t0.elapsed().as_secs_f64();
            calls = st.copy_calls;
            best = best.max((n * layout.chunk_bytes()) as f64 / dt / 1e9);
        }
        out.emit(format!(
            "{{\"recall_bandwidth\":{{\"mode\":\"{mode:?}\",\"chunk_bytes\":{},\"chunks\":4096,\"copy_calls\":{calls},\"gb_per_s\":{best:.2},\"h2d_peak_gb_per_s\":{peak:.2},\"fraction_of_peak\":{:.3}}}}}",
            layout.chunk_bytes(),
            best / peak
        ));
    }
    Ok(())
}

fn build(
    b: &Bench,
    ctx_len: usize,
    layers: usize,
    steps: usize,
    layout: HostLayout,
) -> anyhow::Result<Setup> {
    let n_pages = ctx_len / P;
    let mut host = PinnedHostTier::new(&b.ctx, layout, n_pages)?;
    let mut rng = Rng(0x9e3779b97f4a7c15 ^ ctx_len as u64);
    // Keys: noise plus a per-page direction so that pages differ in relevance; values: noise.
    for blk in 0..n_pages {
        let bias = rng.f() * 0.5;
        for l in 0..layers {
            let page = host.page_mut(blk, l);
            for (i, x) in page.iter_mut().enumerate() {
                let c = i % D;
                let is_key = (i / (P * D)).is_multiple_of(2);
                let v = rng.f() + if is_key && c < 16 { bias } else { 0.0 };
                *x = bf(v);
            }
        }
    }
    let shape = TierShape {
        n_kv: N_KV,
        group: GROUP,
        head_dim: D,
        page_size: P,
        n_slots: N_SLOTS,
        sel_slot0: SINK_PAGES,
        n_sel: N_SEL,
        elem_bytes: 2,
    };
    let dense_shape = TierShape {
        n_slots: n_pages,
        ..shape
    };
    let s = b.compute.cu_stream();
    let mut dense = Vec::new();
    let mut tiers = Vec::new();
    // Stage pages on the device in batches: summarise them and scatter them into the dense cache.
    let batch = 256usize;
    let staging = DeviceBuffer::new(&b.ctx, batch * layout.page_bytes())?;
    let jobs_d = DeviceBuffer::new(&b.ctx, batch * N_KV * 32)?;
    let ptrs_d = DeviceBuffer::new(&b.ctx, batch * 16)?;
    for l in 0..layers {
        let dl = LayerTier::new(&b.ctx, dense_shape, 1)?;
        let mut tl = LayerTier::new(&b.ctx, shape, n_pages)?;
        tl.ensure_summary_capacity(&b.ctx, n_pages, s)?;
        for p0 in (0..n_pages).step_by(batch) {
            let n = batch.min(n_pages - p0);
            for i in 0..n {
                staging.upload(i * layout.page_bytes(), host.page(p0 + i, l))?;
            }
            let srcs: Vec<u64> = (0..n)
                .map(|i| staging.ptr() + (i * layout.page_bytes()) as u64)
                .collect();
            let dsts: Vec<u64> = (0..n).map(|i| tl.summary_ptr(p0 + i)).collect();
            ptrs_d.upload(0, &srcs)?;
            ptrs_d.upload(n * 8, &dsts)?;
            b.k.summarize(
                s,
                ptrs_d.ptr(),
                ptrs_d.ptr() + (n * 8) as u64,
                n,
                N_KV,
                D as i64,
                (2 * P * D) as i64,
                SummaryMode::MinMax,
            )?;
            let jobs: Vec<RecallJob> = (0..n * N_KV)
                .map(|j| RecallJob {
                    slots: dl.slots.ptr(),
                    slot_len: dl.slot_len.ptr(),
                    src: ((j / N_KV) * layout.page_elems() + (j % N_KV) * layout.chunk_elems())
                        as u64,
                    slot: (p0 + j / N_KV) as i32,
                    head: (j % N_KV) as i32,
                })
                .collect();
            jobs_d.upload(0, &jobs)?;
            b.k.recall_scatter(s, staging.ptr(), jobs_d.ptr(), jobs.len(), N_KV)?;
            b.compute.synchronize()?;
        }
        // FreeKV tier: sink pages, window pages (the last full pages), selected slots empty.
        let mut jobs = Vec::new();
        for slot in 0..SINK_PAGES + WIN_PAGES {
            let page = if slot < SINK_PAGES {
                slot
            } else {
                n_pages - WIN_PAGES + (slot - SINK_PAGES)
            };
            let tslot = if slot < SINK_PAGES {
                slot
            } else {
                N_SLOTS - WIN_PAGES + (slot - SINK_PAGES)
            };
            for h in 0..N_KV {
                jobs.push(ChunkCopy {
                    host: host.chunk_ptr(page, l, h),
                    slots: tl.slots.ptr(),
                    slot_len: tl.slot_len.ptr(),
                    slot: tslot as i32,
                    head: h as i32,
                });
            }
        }
        let done = Arc::new(RawEvent::new(&b.ctx)?);
        b.pipe
            .submit(jobs, RecallMode::CopyEngine, None, done.clone())
            .wait_enqueued()?;
        done.synchronize()?;
        dense.push(dl);
        tiers.push(tl);
    }
    // Queries: per layer and head a random direction that drifts (cosine ~0.9 between steps).
    let mut q = vec![0u16; (steps + 4) * layers * N_Q * D];
    let mut cur: Vec<f32> = (0..layers * N_Q * D).map(|_| rng.f()).collect();
    for st in 0..steps + 4 {
        for (i, x) in cur.iter_mut().enumerate() {
            *x = 0.95 * *x + 0.3 * rng.f();
            q[st * layers * N_Q * D + i] = bf(*x);
        }
    }
    let queries = DeviceBuffer::new(&b.ctx, q.len() * 2)?;
    queries.upload(0, &q)?;
    let setup = Setup {
        ctx_len,
        n_pages,
        layers,
        host,
        dense,
        tiers,
        queries,
    };
    Ok(setup)
}

struct Result_ {
    ms: f64,
    pages: f64,
    corr_rate: f64,
}

fn decode(b: &Bench, desc: SeqDesc, q: u64, n_slots: usize, slot: usize) -> anyhow::Result<()> {
    let s = b.compute.cu_stream();
    let bytes = kernels_bytes(&desc);
    b.descs_host_write(slot, &bytes);
    // SAFETY: the pinned descriptor slot is only rewritten after the step synchronizes.
    unsafe {
        result::memcpy_htod_async(
            b.descs.ptr() + (slot * 64) as u64,
            &b.descs_host.as_slice()[slot * 64..slot * 64 + 48],
            s,
        )
    }?;
    let spc = Kernels::decode_slots_per_chunk(1, N_KV, n_slots, b.sms);
    b.k.decode(
        s,
        q,
        (N_Q * D) as i64,
        b.descs.ptr() + (slot * 64) as u64,
        1,
        N_KV,
        n_slots,
        spc,
        b.part_o.ptr(),
        b.part_ml.ptr(),
        b.out.ptr(),
        (N_Q * D) as i64,
        1.0 / (D as f32).sqrt(),
        0.0,
    )
}

fn kernels_bytes(d: &SeqDesc) -> Vec<u8> {
    freekv_plugin::cuda::kernels::as_bytes(std::slice::from_ref(d)).to_vec()
}

impl Bench {
    fn descs_host_write(&self, slot: usize, bytes: &[u8]) {
        // SAFETY: single-threaded use in the bench; the slot's previous copy has completed
        // because every step ends with a synchronize and each layer uses its own slot.
        let p = self.descs_host.as_ptr() as *mut u8;
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), p.add(slot * 64), bytes.len()) };
    }
}

fn run_dense(b: &Bench, st: &Setup, steps: usize) -> anyhow::Result<Result_> {
    let run = |step: usize| -> anyhow::Result<()> {
        for l in 0..st.layers {
            decode(
                b,
                st.dense[l].desc(st.n_pages, 0, 0),
                st.q_ptr(step, l),
                st.n_pages,
                l,
            )?;
        }
        b.compute.synchronize()?;
        Ok(())
    };
    for i in 0..3 {
        run(i)?;
    }
    let t0 = Instant::now();
    for i in 0..steps {
        run(i % (steps + 3))?;
    }
    Ok(Result_ {
        ms: t0.elapsed().as_secs_f64() * 1e3 / steps as f64,
        pages: 0.0,
        corr_rate: 0.0,
    })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Sync,
    Speculative,
    Corrected,
}

/// Selection for layer `l` with query `q` on `stream`, recall lists copied to pinned memory.
fn select(b: &Bench, st: &Setup, l: usize, q: u64, stream: sys::CUstream) -> anyhow::Result<()> {
    let (cb, cc) = st.cand();
    let desc = st.tiers[l].desc(N_SLOTS, cb, cc);
    let slot = st.layers + l;
    b.descs_host_write(slot, &kernels_bytes(&desc));
    let descs = b.descs.ptr() + (slot * 64) as u64;
    // SAFETY: see decode().
    unsafe {
        result::memcpy_htod_async(
            descs,
            &b.descs_host.as_slice()[slot * 64..slot * 64 + 48],
            stream,
        )
    }?;
    let counts = b.counts.ptr() + (l * N_KV * 4) as u64;
    let lists = b.lists.ptr() + (l * N_KV * N_SEL * 8) as u64;
    // Separate scratch per stream: a speculative selection may run beside a corrected one.
    let set = (stream == b.select.cu_stream()) as usize;
    let raw = b.raw.ptr() + (set * N_Q * b.max_pages * 4) as u64;
    let pooled = b.pooled.ptr() + (set * N_KV * b.max_pages * 4) as u64;
    b.k.score_and_pool(
        stream,
        q,
        0,
        descs,
        1,
        N_KV,
        cc,
        cc,
        raw,
        pooled,
        KernelPooling::SoftmaxMean,
    )?;
    b.k.topk_replace(stream, pooled, descs, 1, N_KV, cc, N_SEL, counts, lists)?;
    let host = &b.lists_host.as_slice()[l * N_KV * (N_SEL * 8 + 4)..];
    // SAFETY: the pinned list area of layer l is read only after this stream synchronizes.
    unsafe {
        result::memcpy_dtoh_async(
            std::slice::from_raw_parts_mut(host.as_ptr() as *mut u8, N_KV * 4),
            counts,
            stream,
        )?;
        result::memcpy_dtoh_async(
            std::slice::from_raw_parts_mut(
                host.as_ptr().add(N_KV * 4) as *mut u8,
                N_KV * N_SEL * 8,
            ),
            lists,
            stream,
        )?;
    }
    Ok(())
}

/// The chunks to recall for layer `l` (after its selection synchronized), for the heads in `heads`.
fn chunks_for(b: &Bench, st: &Setup, l: usize, heads: &[bool]) -> Vec<ChunkCopy> {
    let host = &b.lists_host.as_slice()[l * N_KV * (N_SEL * 8 + 4)..];
    let counts: Vec<i32> = (0..N_KV)
        .map(|g| i32::from_le_bytes(host[g * 4..g * 4 + 4].try_into().unwrap()))
        .collect();
    let mut out = Vec::new();
    for g in 0..N_KV {
        if !heads[g] {
            continue;
        }
        for r in 0..counts[g] as usize {
            let o = N_KV * 4 + (g * N_SEL + r) * 8;
            let page = i32::from_le_bytes(host[o..o + 4].try_into().unwrap()) as usize;
            let slot = i32::from_le_bytes(host[o + 4..o + 8].try_into().unwrap());
            out.push(ChunkCopy {
                host: st.host.chunk_ptr(page, l, g),
                slots: st.tiers[l].slots.ptr(),
                slot_len: st.tiers[l].slot_len.ptr(),
                slot,
                head: g as i32,
            });
        }
    }
    out
}

fn run_sparse(b: &Bench, st: &Setup, steps: usize, mode: Mode) -> anyhow::Result<Result_> {
    let s = b.compute.cu_stream();
    let sel = b.select.cu_stream();
    let all = vec![true; N_KV];
    let done: Vec<Arc<RawEvent>> = (0..st.layers)
        .map(|_| RawEvent::new(&b.ctx).map(Arc::new))
        .collect::<anyhow::Result<_>>()?;
    let attn: Vec<Arc<RawEvent>> = (0..st.layers)
        .map(|_| RawEvent::new(&b.ctx).map(Arc::new))
        .collect::<anyhow::Result<_>>()?;
    // First sparse step: blocking select + recall with the current query for every layer.
    for l in 0..st.layers {
        select(b, st, l, st.q_ptr(0, l), s)?;
        b.compute.synchronize()?;
        b.pipe
            .submit(
                chunks_for(b, st, l, &all),
                RecallMode::CopyEngine,
                None,
                done[l].clone(),
            )
            .wait_enqueued()?;
        done[l].wait_on(s)?;
    }
    b.compute.synchronize()?;
    let (mut pages, mut corrected, mut checks) = (0usize, 0usize, 0usize);
    let mut step = |i: usize, count: bool| -> anyhow::Result<()> {
        let mut pending: Option<usize> = None;
        for l in 0..st.layers {
            let q = st.q_ptr(i, l);
            match mode {
                Mode::Sync => {
                    select(b, st, l, q, s)?;
                    b.compute.synchronize()?;
                    let ch = chunks_for(b, st, l, &all);
                    if count {
                        pages += ch.len();
                    }
                    b.pipe
                        .submit(ch, RecallMode::CopyEngine, None, done[l].clone())
                        .wait_enqueued()?;
                    done[l].wait_on(s)?;
                    decode(b, st.tiers[l].desc(N_SLOTS, 0, 0), q, N_SLOTS, l)?;
                }
                Mode::Speculative | Mode::Corrected => {
                    done[l].wait_on(s)?;
                    let mut flagged = vec![false; N_KV];
                    if mode == Mode::Corrected && i > 0 {
                        b.k.correction(
                            s,
                            q,
                            st.q_ptr(i - 1, l),
                            0,
                            1,
                            N_KV,
                            TAU,
                            b.cos.ptr(),
                            b.flags.ptr(),
                        )?;
                        // SAFETY: read after the synchronize below.
                        unsafe {
                            result::memcpy_dtoh_async(
                                std::slice::from_raw_parts_mut(
                                    b.flags_host.as_ptr() as *mut u8,
                                    N_KV * 4,
                                ),
                                b.flags.ptr(),
                                s,
                            )
                        }?;
                        b.compute.synchronize()?;
                        for (g, f) in flagged.iter_mut().enumerate() {
                            *f = b.flags_host.as_slice()[g * 4] != 0;
                        }
                        if count {
                            checks += N_KV;
                            corrected += flagged.iter().filter(|&&f| f).count();
                        }
                    }
                    let any = flagged.iter().any(|&f| f);
                    if any {
                        // Blocking correction: select all heads with q_i now, recall the flagged ones.
                        select(b, st, l, q, s)?;
                        b.compute.synchronize()?;
                        let ch = chunks_for(b, st, l, &flagged);
                        if count {
                            pages += ch.len();
                        }
                        b.pipe
                            .submit(ch, RecallMode::CopyEngine, None, done[l].clone())
                            .wait_enqueued()?;
                        done[l].wait_on(s)?;
                    }
                    decode(b, st.tiers[l].desc(N_SLOTS, 0, 0), q, N_SLOTS, l)?;
                    attn[l].record(s)?;
                    if any {
                        let rest: Vec<bool> = flagged.iter().map(|f| !f).collect();
                        let ch = chunks_for(b, st, l, &rest);
                        if count {
                            pages += ch.len();
                        }
                        b.pipe
                            .submit(
                                ch,
                                RecallMode::CopyEngine,
                                Some(attn[l].clone()),
                                done[l].clone(),
                            )
                            .wait_enqueued()?;
                    } else {
                        // Speculative: select with q_i off the critical path; hand the recall to
                        // the worker one layer later, when the selection has finished.
                        attn[l].wait_on(sel)?;
                        select(b, st, l, q, sel)?;
                        if let Some(pl) = pending.take() {
                            b.select.synchronize()?;
                            let ch = chunks_for(b, st, pl, &all);
                            if count {
                                pages += ch.len();
                            }
                            b.pipe
                                .submit(
                                    ch,
                                    RecallMode::CopyEngine,
                                    Some(attn[pl].clone()),
                                    done[pl].clone(),
                                )
                                .wait_enqueued()?;
                        }
                        pending = Some(l);
                    }
                }
            }
        }
        if let Some(pl) = pending.take() {
            b.select.synchronize()?;
            let ch = chunks_for(b, st, pl, &all);
            if count {
                pages += ch.len();
            }
            b.pipe
                .submit(
                    ch,
                    RecallMode::CopyEngine,
                    Some(attn[pl].clone()),
                    done[pl].clone(),
                )
                .wait_enqueued()?;
        }
        b.compute.synchronize()?;
        Ok(())
    };
    for i in 1..4 {
        step(i, false)?;
    }
    let t0 = Instant::now();
    for i in 0..steps {
        step(4 + (i % (steps.max(1))), true)?;
    }
    // Wait for the last recalls too (they belong to the measured steps).
    b.ctx.synchronize()?;
    let ms = t0.elapsed().as_secs_f64() * 1e3 / steps as f64;
    let _ = st.ctx_len;
    Ok(Result_ {
        ms,
        pages: pages as f64 / steps as f64,
        corr_rate: if checks > 0 {
            corrected as f64 / checks as f64
        } else {
            0.0
        },
    })
}
