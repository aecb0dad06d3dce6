//! [`DeviceOps`] on a CUDA device: chunk moves through the double-buffered [`RecallPipeline`]
//! (copy engines into staging, `freekv_recall_scatter` into the slots), appends by async copies
//! into the window slot, the correction test with `freekv_correction` ([`drift`]), page
//! selection with `freekv_score_pages` / `freekv_pool_scores` / `freekv_plan_pages` over a
//! device mirror of the summaries (on the calling thread's own stream), and decode attention
//! with `freekv_decode_partial` / `freekv_decode_combine`. The orchestration around these calls is
//! [`OffloadBackend`](crate::backend::offload::OffloadBackend)'s, which CI runs on host memory.
//!
//! Streams and ordering: a decode step's work (each row's decode, reading q from the engine's
//! tensor and writing the output tensor, and appends from its k and v) is queued on the
//! engine's own stream ([`CudaBatch`]) and not waited for. Each slot set records its
//! `last_use` event after such work; a chunk move into it waits on that event on the copy
//! streams and records the set's `filled` event when it has landed, which the engine's stream
//! waits on before it next reads or writes the set: a move returns once it is queued (from a
//! registered host tier; copies from pageable memory, and requests larger than both staging
//! buffers, wait while they are enqueued). Freeing a set waits for both events, unregistering a
//! host tier for the device. Every other call (summary uploads, selection) returns once its
//! device work has completed.

use std::marker::PhantomData;
use std::sync::Arc;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use cudarc::driver::{result, sys, CudaContext, CudaStream};

use crate::backend::cpu::elem::KvElem;
use crate::backend::cpu::host_tier::HostTier;
use crate::backend::offload::ops::{consecutive_runs, decode_rows, STAGED_CHUNKS_PER_BUFFER};
use crate::backend::offload::{
    ChunkMove, DecodeDesc, DeviceMemory, DeviceOps, NewToken, PagePlans, PageSelection,
    SelectQuery, SlotMoves,
};
use crate::backend::Role;
use crate::geometry::Geometry;
use crate::{AttnParams, KvDType};

use super::batch::{tensor_ptr, CudaBatch, CudaStaged, StagedDecodeRow};
use super::device_tier::{tier_shape, CudaSlots, DecodeBuffers};
use super::drift::{self, CudaQuery};
use super::kernels::{DecodeLaunch, Kernels, RecallJob, SeqRows};
use super::mem::HostRegistration;
use super::module;
use super::recall::RecallPipeline;
use super::scoring::{summaries_bytes, DeviceSummaries, ScoreBuffers};
use super::source::{KernelConfig, KernelDtype};

/// One CUDA device for one model geometry: its kernels, the engine's stream and the recall
/// pipeline.
pub struct CudaOps<T> {
    geo: Geometry,
    device: Device,
    ctx: Arc<CudaContext>,
    /// Candle's stream for this device: the engine's kernels, and a decode step's work.
    engine: Arc<CudaStream>,
    kernels: Arc<Kernels>,
    pipeline: RecallPipeline,
    sm_count: usize,
    _elem: PhantomData<fn() -> T>,
}

/// Per-thread device memory: the decode partials (caller thread only), the scoring buffers and
/// their stream, and host staging.
pub struct CudaOpsScratch<T> {
    decode: Option<DecodeBuffers>,
    score: Option<ScoreBuffers>,
    /// 16-bit rows: a query to score with.
    rows: Vec<T>,
}

impl<T: KvElem> CudaOps<T> {
    /// The device for `geo` on `device` (a candle CUDA device): compiles and loads the kernels
    /// for this configuration and starts the recall pipeline. Errors name what is unsupported
    /// (f32 KV, head dims other than 64/128/256, page sizes other than 8/16/32).
    pub fn new(geo: Geometry, device: &Device) -> anyhow::Result<Self> {
        let Device::Cuda(cuda) = device else {
            anyhow::bail!(
                "the FreeKV CUDA backend needs a CUDA device, got {:?}",
                device.location()
            );
        };
        let dtype = match T::DTYPE {
            KvDType::F16 => KernelDtype::F16,
            KvDType::BF16 => KernelDtype::Bf16,
            KvDType::F32 => anyhow::bail!(
                "the FreeKV CUDA kernels store KV as f16 or bf16; f32 KV runs on the CPU backend"
            ),
        };
        let kcfg = KernelConfig {
            dtype,
            head_dim: geo.head_dim,
            page_size: geo.page_size,
            group: geo.group,
        };
        kcfg.validate().map_err(|e| {
            anyhow::anyhow!("the FreeKV CUDA kernels do not support this model: {e}")
        })?;
        let engine = cuda.cuda_stream();
        let ctx = engine.context().clone();
        ctx.bind_to_thread()?;
        let kernels = Arc::new(Kernels::new(module::load(&ctx, kcfg)?));
        let chunk_bytes = 2 * geo.page_size * geo.head_dim * 2;
        let per_buffer = (geo.num_kv_heads * geo.slots).clamp(1, STAGED_CHUNKS_PER_BUFFER);
        let pipeline = RecallPipeline::new(
            &ctx,
            kernels.clone(),
            chunk_bytes,
            per_buffer,
            geo.num_kv_heads,
        )?;
        let sm_count = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?
            .max(1) as usize;
        Ok(Self {
            geo,
            device: device.clone(),
            ctx,
            engine,
            kernels,
            pipeline,
            sm_count,
            _elem: PhantomData,
        })
    }

    fn bind(&self) -> anyhow::Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| anyhow::anyhow!("binding the CUDA context to this thread: {e}"))
    }

    /// The candle dtype of the stored KV.
    fn kv_dtype() -> DType {
        match T::DTYPE {
            KvDType::BF16 => DType::BF16,
            _ => DType::F16,
        }
    }

    /// Bytes of one token's K (or V) rows of every KV head.
    fn kv_row_bytes(&self) -> usize {
        self.geo.num_kv_heads * self.geo.head_dim * 2
    }

    /// Every set's chunk moves as one request to the recall pipeline: the copies wait on the
    /// device for each set's last reader and previous move; each set's `filled` event is
    /// recorded once all have landed, and whatever reads or writes a set next on the engine's
    /// stream waits for it there. Returns once the request is enqueued.
    fn move_into_sets(
        &self,
        host: &HostTier<T>,
        sets: &mut [SlotMoves<'_, CudaSlots>],
    ) -> anyhow::Result<()> {
        let mut chunks = Vec::new();
        let (mut waits, mut done) = (Vec::new(), Vec::new());
        for set in sets.iter().filter(|s| !s.moves.is_empty()) {
            let shape = &set.slots.shape;
            if let Some(m) = set
                .moves
                .iter()
                .find(|m| m.slot as usize >= shape.n_slots || m.head as usize >= shape.n_kv)
            {
                anyhow::bail!(
                    "chunk move into slot {} head {} of {} slots of {} KV heads",
                    m.slot,
                    m.head,
                    shape.n_slots,
                    shape.n_kv
                );
            }
            chunks.extend(set.moves.iter().map(|m| RecallJob {
                src: host.chunk(m.block, m.head as usize).as_ptr() as u64,
                slots: set.slots.slots.ptr(),
                slot: m.slot as i32,
                head: m.head as i32,
            }));
            waits.extend([set.slots.last_use.clone(), set.slots.filled.clone()]);
            done.push(set.slots.filled.clone());
        }
        if chunks.is_empty() {
            return Ok(());
        }
        self.bind()?;
        // The host chunks stay allocated and registered until the copies have run (the host
        // tier is freed after its registration, whose release waits for the device).
        self.pipeline.submit(chunks, waits, done).wait_enqueued()?;
        for set in sets.iter().filter(|s| !s.moves.is_empty()) {
            set.slots.note_move();
        }
        Ok(())
    }

    /// The thread's scoring buffers (and stream), created on first use.
    fn score_buffers<'a>(
        &self,
        score: &'a mut Option<ScoreBuffers>,
    ) -> anyhow::Result<&'a mut ScoreBuffers> {
        if score.is_none() {
            *score = Some(ScoreBuffers::new(&self.ctx, &self.geo)?);
        }
        Ok(score.as_mut().expect("created above"))
    }
}

impl<T: KvElem> DeviceMemory<T> for CudaOps<T> {
    type Slots = CudaSlots;
    type Scratch = CudaOpsScratch<T>;
    /// None where the system refused to page-lock the pages.
    type HostPin = HostRegistration;
    type Summaries = DeviceSummaries;
    type Batch = CudaBatch;
    type Staged = CudaStaged;
    type Query = CudaQuery<T>;

    fn device(&self) -> &Device {
        &self.device
    }

    /// Two: a worker mostly waits for the GPU (its selection's plans, a step's staged values),
    /// so a second one selects for a layer queued behind it meanwhile.
    fn default_workers(&self) -> usize {
        2
    }

    fn alloc_batch(&self) -> CudaBatch {
        CudaBatch::default()
    }

    fn alloc_slots(&self, n_slots: usize) -> anyhow::Result<CudaSlots> {
        self.bind()?;
        CudaSlots::new(&self.ctx, tier_shape(&self.geo, n_slots))
    }

    fn slots_bytes(&self, n_slots: usize) -> usize {
        tier_shape(&self.geo, n_slots).bytes()
    }

    fn alloc_scratch(&self, _role: Role) -> CudaOpsScratch<T> {
        CudaOpsScratch {
            decode: None,
            score: None,
            rows: Vec::new(),
        }
    }

    fn pin_host(&self, pages: &[T]) -> Option<HostRegistration> {
        let bytes = std::mem::size_of_val(pages);
        if bytes == 0 {
            return None;
        }
        match HostRegistration::new(&self.ctx, pages.as_ptr() as *const u8, bytes) {
            Ok(pin) => Some(pin),
            Err(e) => {
                tracing::warn!(
                    "FreeKV: could not page-lock a layer's host tier ({bytes} bytes: {e}); its \
                     recalls copy from pageable memory, through the driver's staging, at lower \
                     bandwidth. A smaller pool (--pa-memory-mb or --pa-context-len) can be pinned."
                );
                None
            }
        }
    }

    fn alloc_summaries(&self, num_blocks: usize) -> anyhow::Result<DeviceSummaries> {
        self.bind()?;
        DeviceSummaries::new(&self.ctx, &self.geo, num_blocks)
    }

    fn summaries_bytes(&self, num_blocks: usize) -> usize {
        summaries_bytes(&self.geo, num_blocks)
    }

    fn upload_summaries(
        &self,
        host: &HostTier<T>,
        mirror: &mut DeviceSummaries,
        blocks: &[u32],
        scratch: &mut CudaOpsScratch<T>,
    ) -> anyhow::Result<()> {
        self.bind()?;
        let bufs = self.score_buffers(&mut scratch.score)?;
        mirror.upload(host, blocks, &bufs.stream)
    }

    fn alloc_query(&self) -> anyhow::Result<CudaQuery<T>> {
        self.bind()?;
        CudaQuery::new(&self.ctx, &self.geo, &self.engine)
    }

    fn query_bytes(&self) -> usize {
        drift::query_bytes(&self.geo)
    }

    fn upload_query(&self, query: &[f32], dst: &mut CudaQuery<T>) -> anyhow::Result<()> {
        self.bind()?;
        dst.upload(query, &self.engine)
    }
}

impl<T: KvElem> DeviceOps<T> for CudaOps<T> {
    fn load_batch(
        &self,
        batch: &mut CudaBatch,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> anyhow::Result<()> {
        let (n_q, d) = (self.geo.num_q_heads(), self.geo.head_dim);
        let b = decode_rows(&self.geo, q, k, v)?;
        for t in [q, k, v] {
            anyhow::ensure!(
                t.device().same_device(&self.device),
                "a decode step's tensors on {:?}, but FreeKV's working sets on {:?}",
                t.device().location(),
                self.device.location()
            );
        }
        self.bind()?;
        batch.begin()?;
        // In place where the engine's dtype is the KV dtype (no copy: same tensor).
        let dt = Self::kv_dtype();
        let [q, k, v] = [q, k, v].map(|t| t.to_dtype(dt).and_then(|t| t.contiguous()));
        let inputs = [q?, k?, v?];
        let out = Tensor::zeros((b, n_q, d), dt, &self.device)?;
        let s = &self.engine;
        (batch.q, batch.k, batch.v) = (
            tensor_ptr(&inputs[0], s)?,
            tensor_ptr(&inputs[1], s)?,
            tensor_ptr(&inputs[2], s)?,
        );
        batch.out_ptr = tensor_ptr(&out, s)?;
        (batch.inputs, batch.out, batch.rows) = (Some(inputs), Some(out), b);
        Ok(())
    }

    fn stage_batch(
        &self,
        batch: &CudaBatch,
        reuse: Option<CudaStaged>,
    ) -> anyhow::Result<CudaStaged> {
        self.bind()?;
        CudaStaged::start(&self.ctx, &self.engine, batch, reuse)
    }

    fn read_staged(&self, staged: &CudaStaged) -> anyhow::Result<[Tensor; 3]> {
        self.bind()?;
        staged.read()
    }

    fn finish_batch(
        &self,
        batch: &mut CudaBatch,
        host_rows: &[usize],
        host_out: &[f32],
        dtype: DType,
    ) -> anyhow::Result<Tensor> {
        let g = &self.geo;
        let (n_q, d) = (g.num_q_heads(), g.head_dim);
        let out = batch
            .out
            .take()
            .ok_or_else(|| anyhow::anyhow!("the output of a decode batch taken twice"))?;
        anyhow::ensure!(
            host_rows.is_empty()
                || (host_out.len() == batch.rows * n_q * d
                    && host_rows.iter().all(|&r| r < batch.rows)),
            "a {}-row decode batch merged with {} host-computed values of rows {host_rows:?}",
            batch.rows,
            host_out.len()
        );
        let out = if host_rows.is_empty() {
            out
        } else {
            // Rows the host attended (a fallback): each uploaded and put in its place.
            let w = n_q * d;
            let rows = (0..batch.rows)
                .map(|r| {
                    if host_rows.contains(&r) {
                        Tensor::from_slice(&host_out[r * w..(r + 1) * w], (1, n_q, d), &self.device)
                            .and_then(|t| t.to_dtype(out.dtype()))
                    } else {
                        out.narrow(0, r, 1)
                    }
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            Tensor::cat(&rows, 0)?
        };
        Ok(out.to_dtype(dtype)?)
    }

    fn select_pages(
        &self,
        mirror: &DeviceSummaries,
        batch: &CudaBatch,
        jobs: &[PageSelection<'_>],
        out: &mut PagePlans,
        scratch: &mut CudaOpsScratch<T>,
    ) -> anyhow::Result<()> {
        // Every head of every sequence is planned (the rows not asked for are cheap and not
        // read); one pooling for the call.
        self.bind()?;
        if let Some(j) = jobs.iter().find(|j| j.pooling != jobs[0].pooling) {
            anyhow::bail!(
                "one page selection call with two poolings ({:?} and {:?})",
                jobs[0].pooling,
                j.pooling
            );
        }
        let q_len = self.geo.num_q_heads() * self.geo.head_dim;
        let rows = &mut scratch.rows;
        rows.clear();
        rows.resize(jobs.len() * q_len, T::default());
        // The host's queries in 16 bits; a query read in place is copied over its row after.
        for (job, dst) in jobs.iter().zip(rows.chunks_mut(q_len)) {
            if let SelectQuery::Host(query) = job.query {
                anyhow::ensure!(
                    query.len() == q_len,
                    "page selection got a {}-value query ({q_len} expected)",
                    query.len()
                );
                T::from_f32s(query, dst);
            }
        }
        let bufs = self.score_buffers(&mut scratch.score)?;
        bufs.select(&self.kernels, mirror, batch, jobs, rows, out)
    }

    fn query_similarities(
        &self,
        batch: &mut CudaBatch,
        rows: &[(usize, &CudaQuery<T>)],
        out: &mut [f32],
    ) -> anyhow::Result<()> {
        self.bind()?;
        drift::similarities(
            &self.ctx,
            &self.engine,
            &self.kernels,
            &self.geo,
            batch,
            rows,
            out,
        )
    }

    fn move_chunks(
        &self,
        host: &HostTier<T>,
        slots: &mut CudaSlots,
        moves: &[ChunkMove],
        _scratch: Option<&mut CudaOpsScratch<T>>,
    ) -> anyhow::Result<()> {
        self.move_into_sets(host, &mut [SlotMoves { slots, moves }])
    }

    fn move_chunks_into_sets(
        &self,
        host: &HostTier<T>,
        sets: &mut [SlotMoves<'_, CudaSlots>],
        _scratch: Option<&mut CudaOpsScratch<T>>,
    ) -> anyhow::Result<()> {
        self.move_into_sets(host, sets)
    }

    fn append_token(
        &self,
        slots: &mut CudaSlots,
        slot: usize,
        token: usize,
        rows: NewToken<'_, T, CudaBatch>,
    ) -> anyhow::Result<()> {
        let shape = &slots.shape;
        let row_bytes = self.kv_row_bytes();
        anyhow::ensure!(
            slot < shape.n_slots && token < shape.page_size,
            "append at slot {slot} token {token} of {} slots of {} tokens",
            shape.n_slots,
            shape.page_size
        );
        self.bind()?;
        // NHD: token `token`'s K rows of all heads are one contiguous run, its V rows another.
        let k_off = (slot * 2 * shape.page_size + token) * row_bytes;
        let v_off = ((slot * 2 + 1) * shape.page_size + token) * row_bytes;
        let s = self.engine.cu_stream();
        // After any move into the slots (a reset may have copied this page).
        slots.after_moves(s)?;
        let queued = match rows {
            NewToken::Host { k, v } => {
                anyhow::ensure!(
                    std::mem::size_of_val(k) == row_bytes && std::mem::size_of_val(v) == row_bytes,
                    "append of {}-byte rows into {row_bytes}-byte slot rows",
                    std::mem::size_of_val(k)
                );
                // SAFETY: bounds checked by the buffer; the rows are pageable memory, which the
                // driver stages before these calls return, so they may be reused at once.
                unsafe {
                    slots
                        .slots
                        .copy_from_host_async(k_off, k, s)
                        .and_then(|()| slots.slots.copy_from_host_async(v_off, v, s))
                }
            }
            NewToken::Batch { batch, row } => {
                anyhow::ensure!(
                    row < batch.rows,
                    "append of row {row} of a {}-row batch",
                    batch.rows
                );
                let src = (row * row_bytes) as u64;
                // SAFETY: both ranges lie in live allocations (the batch holds its tensors, the
                // offsets are bounded above); the copies are ordered on the engine's stream
                // after the kernels that produced k and v.
                let dst = slots.slots.ptr();
                unsafe {
                    result::memcpy_dtod_async(dst + k_off as u64, batch.k + src, row_bytes, s)
                        .and_then(|()| {
                            result::memcpy_dtod_async(
                                dst + v_off as u64,
                                batch.v + src,
                                row_bytes,
                                s,
                            )
                        })
                        .map_err(anyhow::Error::from)
                }
            }
        };
        // Recorded whether or not both copies were queued: a queued one is covered either way
        // (and where the record fails, the copies are waited for).
        if let Err(e) = slots.last_use.record(s) {
            let _ = self.engine.synchronize();
            return Err(e);
        }
        queued.context("queueing the copy of a new token into its slot")
    }

    fn decode(
        &self,
        rows: &[DecodeDesc<'_, CudaSlots>],
        batch: &mut CudaBatch,
        params: &AttnParams,
        scratch: &mut CudaOpsScratch<T>,
    ) -> anyhow::Result<()> {
        let geo = &self.geo;
        let n_kv = geo.num_kv_heads;
        let mut live = Vec::with_capacity(rows.len());
        for r in rows {
            let n_slots = r.index.map_or(geo.slots, <[u32]>::len);
            let stored = r.slots.shape.n_slots;
            anyhow::ensure!(
                r.row < batch.rows && batch.out.is_some() && r.slot_len.len() == n_slots * n_kv,
                "decode of row {} of a {}-row batch over {n_slots} slots got {} slot lengths",
                r.row,
                batch.rows,
                r.slot_len.len()
            );
            let last = r
                .index
                .map_or(Some(n_slots.saturating_sub(1) as u32), |ix| {
                    ix.iter().copied().max()
                });
            if let Some(bad) = last.filter(|&s| s as usize >= stored) {
                anyhow::bail!("decode reads slot {bad} of {stored}");
            }
            // A row with nothing to attend stays zero.
            if n_slots > 0 {
                live.push((r, n_slots));
            }
        }
        // One launch per run of consecutive batch rows (every row of a step on the device:
        // one launch per layer); descriptor `s` of a launch serves its `s`-th row.
        live.sort_by_key(|(r, _)| r.row);
        let rows: Vec<usize> = live.iter().map(|(r, _)| r.row).collect();
        for run in consecutive_runs(&rows) {
            self.decode_run(&live[run], batch, params, scratch)?;
        }
        Ok(())
    }
}

impl<T: KvElem> CudaOps<T> {
    /// One launch of the decode kernels for consecutive batch rows (each with its slot count).
    fn decode_run(
        &self,
        run: &[(&DecodeDesc<'_, CudaSlots>, usize)],
        batch: &mut CudaBatch,
        params: &AttnParams,
        scratch: &mut CudaOpsScratch<T>,
    ) -> anyhow::Result<()> {
        let geo = &self.geo;
        let (n_kv, n_q, d) = (geo.num_kv_heads, geo.num_q_heads(), geo.head_dim);
        let max_slots = run.iter().map(|&(_, n)| n).max().unwrap_or(0);
        self.bind()?;
        if scratch.decode.is_none() {
            let bufs = DecodeBuffers::new(&self.ctx, geo, self.sm_count, &self.engine)?;
            scratch.decode = Some(bufs);
        }
        let bufs = scratch.decode.as_mut().expect("allocated above");
        let slots_per_chunk = bufs.prepare(geo, run.len(), max_slots)?;
        let staged: Vec<_> = run
            .iter()
            .map(|&(r, n)| StagedDecodeRow {
                lens: r.slot_len,
                index: r.index,
                desc: r.slots.desc(n),
            })
            .collect();
        let descs = batch.stage_decode(&self.ctx, &self.engine, &staged)?;
        let row_off = (run[0].0.row * n_q * d * 2) as u64;
        let s = self.engine.cu_stream();
        // The pages moved into the slots have landed.
        for &(r, _) in run {
            r.slots.after_moves(s)?;
        }
        let rows = |ptr| SeqRows {
            ptr: ptr + row_off,
            seq_stride: (n_q * d) as i64,
        };
        let launched = self.kernels.decode(
            s,
            &DecodeLaunch {
                q: rows(batch.q),
                descs,
                n_seq: run.len(),
                n_kv,
                max_slots,
                slots_per_chunk,
                part_o: bufs.part_o.ptr(),
                part_ml: bufs.part_ml.ptr(),
                out: rows(batch.out_ptr),
                scale: params.softmax_scale,
                softcap: params.softcap.unwrap_or(0.0),
            },
        );
        // Whether or not both kernels were queued (a queued one still reads them): the
        // descriptors stay allocated, and the slots unwritten, until the kernels have run.
        let mut guarded = batch.guard_descriptors(s);
        for &(r, _) in run {
            guarded = guarded.and_then(|()| r.slots.last_use.record(s));
        }
        if guarded.is_err() {
            let _ = self.engine.synchronize();
        }
        launched.and(guarded)
    }
}
