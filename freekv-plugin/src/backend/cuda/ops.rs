//! [`DeviceOps`] on a CUDA device: chunk moves through the double-buffered [`RecallPipeline`]
//! (copy engines into staging, `freekv_recall_scatter` into the slots), appends by async copies
//! into the window slot, page scoring with `freekv_score_pages` / `freekv_pool_scores` over a
//! device mirror of the summaries (on the calling thread's own stream), and decode attention
//! with `freekv_decode_partial` / `freekv_decode_combine`. The orchestration around these calls is
//! [`OffloadBackend`](crate::backend::offload::OffloadBackend)'s, which CI runs on host memory.
//!
//! Every call returns only once its device work has completed, as [`DeviceOps`] requires.

use std::marker::PhantomData;
use std::sync::Arc;

use candle_core::Device;
use cudarc::driver::{result, sys, CudaContext, CudaStream};

use crate::backend::cpu::elem::KvElem;
use crate::backend::cpu::host_tier::HostTier;
use crate::backend::offload::{ChunkMove, DeviceOps};
use crate::backend::Role;
use crate::geometry::Geometry;
use crate::{AttnParams, KvDType, Pooling};

use super::device_tier::{layer_tier_bytes, tier_shape, DecodeBuffers, LayerTier};
use super::kernels::{as_bytes, KernelPooling, Kernels, RecallJob};
use super::mem::{DeviceBuffer, HostRegistration};
use super::module;
use super::recall::{RawEvent, RecallMode, RecallPipeline};
use super::scoring::{summaries_bytes, DeviceSummaries, ScoreBuffers};
use super::source::{KernelConfig, KernelDtype};

/// Most chunks per staging buffer of the recall pipeline.
const MAX_CHUNKS_PER_BUFFER: usize = 256;

/// One CUDA device for one model geometry: its kernels, a compute stream and the recall
/// pipeline.
pub struct CudaOps<T> {
    geo: Geometry,
    device: Device,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    kernels: Arc<Kernels>,
    pipeline: RecallPipeline,
    sm_count: usize,
    _elem: PhantomData<fn() -> T>,
}

/// Per-thread device memory: the decode buffers (caller thread only), the scoring buffers and
/// their stream, and host staging.
pub struct CudaOpsScratch<T> {
    decode: Option<DecodeBuffers>,
    score: Option<ScoreBuffers>,
    /// The event this thread's recalls signal completion with, created on first use.
    done: Option<Arc<RawEvent>>,
    /// 16-bit rows: the query in, the output back.
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
        let ctx = cuda.cuda_stream().context().clone();
        ctx.bind_to_thread()?;
        let kernels = Arc::new(Kernels::new(module::load(&ctx, kcfg)?));
        let stream = ctx.new_stream()?;
        let chunk_bytes = 2 * geo.page_size * geo.head_dim * 2;
        let per_buffer = (geo.num_kv_heads * geo.slots).clamp(1, MAX_CHUNKS_PER_BUFFER);
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
            stream,
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

impl<T: KvElem> DeviceOps<T> for CudaOps<T> {
    type Slots = LayerTier;
    type Scratch = CudaOpsScratch<T>;
    /// None where the system refused to page-lock the pages.
    type HostPin = Option<HostRegistration>;
    type Summaries = DeviceSummaries;

    fn device(&self) -> &Device {
        &self.device
    }

    fn alloc_slots(&self, n_slots: usize) -> anyhow::Result<LayerTier> {
        self.bind()?;
        LayerTier::new(&self.ctx, tier_shape(&self.geo, n_slots))
    }

    fn slots_bytes(&self, n_slots: usize) -> usize {
        layer_tier_bytes(&tier_shape(&self.geo, n_slots))
    }

    fn alloc_scratch(&self, _role: Role) -> CudaOpsScratch<T> {
        CudaOpsScratch {
            decode: None,
            score: None,
            done: None,
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

    fn score_pages(
        &self,
        mirror: &DeviceSummaries,
        blocks: &[u32],
        query: &[f32],
        _heads: &[bool],
        pooling: Pooling,
        out: &mut [f32],
        scratch: &mut CudaOpsScratch<T>,
    ) -> anyhow::Result<()> {
        // Every head is scored (one launch; the unselected rows are cheap and ignored).
        self.bind()?;
        let pooling = match pooling {
            Pooling::SoftmaxMean => KernelPooling::SoftmaxMean,
            Pooling::Mean => KernelPooling::Mean,
            Pooling::Max => KernelPooling::Max,
        };
        let rows = &mut scratch.rows;
        rows.clear();
        rows.resize(query.len(), T::default());
        T::from_f32s(query, rows);
        let bufs = self.score_buffers(&mut scratch.score)?;
        bufs.score(
            &self.ctx,
            &self.kernels,
            &self.geo,
            mirror,
            blocks,
            rows,
            pooling,
            out,
        )
    }

    fn move_chunks(
        &self,
        host: &HostTier<T>,
        slots: &mut LayerTier,
        moves: &[ChunkMove],
        scratch: Option<&mut CudaOpsScratch<T>>,
    ) -> anyhow::Result<()> {
        if moves.is_empty() {
            return Ok(());
        }
        if let Some(m) = moves
            .iter()
            .find(|m| m.slot as usize >= slots.shape.n_slots || m.head as usize >= slots.shape.n_kv)
        {
            anyhow::bail!(
                "chunk move into slot {} head {} of {} slots of {} KV heads",
                m.slot,
                m.head,
                slots.shape.n_slots,
                slots.shape.n_kv
            );
        }
        self.bind()?;
        let chunks: Vec<RecallJob> = moves
            .iter()
            .map(|m| RecallJob {
                src: host.chunk(m.block, m.head as usize).as_ptr() as u64,
                slots: slots.slots.ptr(),
                slot_len: slots.slot_len.ptr(),
                slot: m.slot as i32,
                head: m.head as i32,
            })
            .collect();
        // One event per thread, reused (a working-set reset, which has no scratch, makes its own).
        let done = match scratch {
            Some(sc) => match &sc.done {
                Some(e) => e.clone(),
                None => sc.done.insert(Arc::new(RawEvent::new(&self.ctx)?)).clone(),
            },
            None => Arc::new(RawEvent::new(&self.ctx)?),
        };
        // The host chunks are borrowed for this call: the copy engines stage them, and we wait
        // for the request to finish before returning.
        let ticket = self
            .pipeline
            .submit(chunks, RecallMode::CopyEngine, None, done.clone());
        ticket.wait_enqueued()?;
        done.synchronize()
    }

    fn append_token(
        &self,
        slots: &mut LayerTier,
        slot: usize,
        token: usize,
        k: &[T],
        v: &[T],
    ) -> anyhow::Result<()> {
        let shape = &slots.shape;
        let row_bytes = shape.n_kv * shape.head_dim * 2;
        anyhow::ensure!(
            std::mem::size_of::<T>() == 2 && k.len() * 2 == row_bytes && v.len() * 2 == row_bytes,
            "append of a {}-element row with {}-byte elements into a {row_bytes}-byte slot row",
            k.len(),
            std::mem::size_of::<T>()
        );
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
        let s = self.stream.cu_stream();
        // SAFETY: `k`/`v` outlive the copies: the stream is synchronized before returning.
        unsafe {
            slots.slots.copy_from_host_async(k_off, k, s)?;
            slots.slots.copy_from_host_async(v_off, v, s)?;
        }
        self.stream.synchronize()?;
        Ok(())
    }

    fn decode(
        &self,
        slots: &LayerTier,
        index: Option<&[u32]>,
        slot_len: &[i32],
        q: &[f32],
        params: &AttnParams,
        out: &mut [f32],
        scratch: &mut CudaOpsScratch<T>,
    ) -> anyhow::Result<()> {
        let geo = &self.geo;
        let (n_kv, n_q, d) = (geo.num_kv_heads, geo.num_q_heads(), geo.head_dim);
        let n_slots = index.map_or(geo.slots, <[u32]>::len);
        let stored = slots.shape.n_slots;
        anyhow::ensure!(
            q.len() == n_q * d && out.len() == n_q * d && slot_len.len() == n_slots * n_kv,
            "decode over {n_slots} slots got a {}-value query, a {}-value output and {} slot lengths",
            q.len(),
            out.len(),
            slot_len.len()
        );
        let last = index.map_or(Some(n_slots.saturating_sub(1) as u32), |ix| {
            ix.iter().copied().max()
        });
        if let Some(bad) = last.filter(|&s| s as usize >= stored) {
            anyhow::bail!("decode reads slot {bad} of {stored}");
        }
        if n_slots == 0 {
            out.fill(0.0);
            return Ok(());
        }
        self.bind()?;
        if scratch.decode.is_none() {
            scratch.decode = Some(DecodeBuffers::new(&self.ctx, geo, self.sm_count)?);
        }
        let CudaOpsScratch {
            decode: Some(bufs),
            rows,
            ..
        } = scratch
        else {
            unreachable!("decode buffers were allocated above")
        };
        let slots_per_chunk = bufs.prepare(geo, n_slots)?;
        rows.clear();
        rows.resize(n_q * d, T::default());
        T::from_f32s(q, rows);
        let mut desc = slots.desc(n_slots);
        desc.slot_len = bufs.lens.ptr();
        if index.is_some() {
            desc.slot_index = bufs.index.ptr();
        }
        let desc = [desc];
        let s = self.stream.cu_stream();
        // SAFETY: the host slices live until the stream is synchronized below.
        unsafe {
            bufs.lens.copy_from_host_async(0, slot_len, s)?;
            if let Some(ix) = index {
                bufs.index.copy_from_host_async(0, ix, s)?;
            }
            bufs.q.copy_from_host_async(0, rows, s)?;
            bufs.desc.copy_from_host_async(0, as_bytes(&desc), s)?;
        }
        self.kernels.decode(
            s,
            bufs.q.ptr(),
            (n_q * d) as i64,
            bufs.desc.ptr(),
            1,
            n_kv,
            n_slots,
            slots_per_chunk,
            bufs.part_o.ptr(),
            bufs.part_ml.ptr(),
            bufs.out.ptr(),
            (n_q * d) as i64,
            params.softmax_scale,
            params.softcap.unwrap_or(0.0),
        )?;
        download(&bufs.out, rows, &self.stream)?;
        T::to_f32s(rows, out);
        Ok(())
    }
}

/// Copies the start of `src` into `dst` on `stream` and waits for it.
fn download<T>(src: &DeviceBuffer, dst: &mut [T], stream: &Arc<CudaStream>) -> anyhow::Result<()> {
    anyhow::ensure!(
        std::mem::size_of_val(dst) <= src.bytes(),
        "download of {} bytes from a {}-byte buffer",
        std::mem::size_of_val(dst),
        src.bytes()
    );
    // SAFETY: bounds checked above; `dst` is borrowed until the stream is synchronized.
    unsafe { result::memcpy_dtoh_async(dst, src.ptr(), stream.cu_stream()) }?;
    stream.synchronize()?;
    Ok(())
}
