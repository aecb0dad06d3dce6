//! Page selection on a CUDA device: one layer's mirror of the host tier's page summaries
//! ([`DeviceSummaries`], `[n_kv][block][upper d | lower d]`, written as pages fill) and one
//! thread's buffers for a selection ([`ScoreBuffers`]: the query, the candidates' blocks, raw
//! and pooled scores, the selected slots' pages and the plans), on that thread's own stream.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaStream};

use crate::backend::cpu::elem::KvElem;
use crate::backend::cpu::host_tier::HostTier;
use crate::backend::offload::page_plans::plan_row_len;
use crate::backend::offload::{PagePlans, PageSelection, SelectQuery};
use crate::geometry::Geometry;
use crate::Pooling;

use super::batch::CudaBatch;
use super::kernels::{
    as_bytes, plan_work_bytes, KernelPooling, Kernels, PlanLaunch, ScoreLaunch, SeqDesc, SeqRows,
};
use super::mem::DeviceBuffer;

/// One layer's page summaries in device memory, laid out as the host tier's.
pub struct DeviceSummaries {
    /// The summaries, `[n_kv][block][upper d | lower d]` 16-bit elements.
    pub buf: DeviceBuffer,
    /// Blocks of the pool mirrored.
    pub num_blocks: usize,
    n_kv: usize,
    /// Elements of one (block, head) summary: upper and lower bound, `2 d`.
    width: usize,
}

/// Bytes of the summaries of `num_blocks` blocks with 16-bit elements.
pub fn summaries_bytes(geo: &Geometry, num_blocks: usize) -> usize {
    num_blocks.saturating_mul(geo.num_kv_heads * 2 * geo.head_dim * 2)
}

impl DeviceSummaries {
    /// Zeroed summaries for a pool of `num_blocks` blocks.
    pub fn new(ctx: &Arc<CudaContext>, geo: &Geometry, num_blocks: usize) -> anyhow::Result<Self> {
        let bytes = summaries_bytes(geo, num_blocks).max(1);
        let buf = DeviceBuffer::zeroed(ctx, bytes).map_err(|e| {
            anyhow::anyhow!(
                "{e} (the page summaries of {num_blocks} blocks, {bytes} bytes of device memory; \
                 a smaller pool, --pa-memory-mb or --pa-context-len, needs fewer)"
            )
        })?;
        Ok(Self {
            buf,
            num_blocks,
            n_kv: geo.num_kv_heads,
            width: 2 * geo.head_dim,
        })
    }

    /// Copies the host tier's summaries of `blocks` (sorted, distinct), every KV head: one
    /// copy per head and run of consecutive blocks, on `stream`, and waits for them.
    pub fn upload<T: KvElem>(
        &mut self,
        host: &HostTier<T>,
        blocks: &[u32],
        stream: &Arc<CudaStream>,
    ) -> anyhow::Result<()> {
        anyhow::ensure!(
            host.num_blocks() == self.num_blocks && std::mem::size_of::<T>() == 2,
            "summaries of a {}-block host tier into a {}-block device mirror",
            host.num_blocks(),
            self.num_blocks
        );
        if let Some(&last) = blocks.last() {
            anyhow::ensure!(
                (last as usize) < self.num_blocks,
                "summary upload of block {last} into a mirror of {} blocks",
                self.num_blocks
            );
        }
        let (all, w) = (host.summaries(), self.width);
        let s = stream.cu_stream();
        let mut i = 0;
        while i < blocks.len() {
            let mut j = i + 1;
            while j < blocks.len() && blocks[j] == blocks[j - 1] + 1 {
                j += 1;
            }
            let run = j - i;
            for h in 0..self.n_kv {
                let o = host.summary_offset(blocks[i], h);
                let src = &all[o..o + run * w];
                // SAFETY: `src` lives in the host tier, which the caller borrows until the
                // stream is synchronized below; the destination range is checked by the call.
                unsafe { self.buf.copy_from_host_async(o * 2, src, s) }?;
            }
            i = j;
        }
        stream.synchronize()?;
        Ok(())
    }
}

/// One thread's selection buffers, grown to the largest call seen: the queries, the candidates'
/// blocks, raw and pooled scores, the selected slots' pages, the plans; and the host's staging
/// of the call's inputs.
pub struct ScoreBuffers {
    /// The thread's own stream, on which its selections run.
    pub stream: Arc<CudaStream>,
    q: Grown,
    desc: Grown,
    first: Grown,
    blocks: Grown,
    raw: Grown,
    pooled: Grown,
    resident: Grown,
    plan: Grown,
    work: Grown,
    /// A call's inputs on the host: candidate blocks `[n_seq][stride]`, first pages, resident
    /// pages `[n_seq][n_kv][n_sel]`, descriptors.
    host_blocks: Vec<u32>,
    host_first: Vec<i32>,
    host_resident: Vec<u32>,
    host_desc: Vec<SeqDesc>,
    /// The plans as read back, `[n_seq][n_kv]` rows of `plan_row_len(sel_pages)`.
    host_plan: Vec<u32>,
    ctx: Arc<CudaContext>,
    geo: Geometry,
}

/// A device buffer that grows (to the next power of two) when a call needs more.
struct Grown(Option<DeviceBuffer>);

impl Grown {
    /// The buffer, at least `bytes` long.
    fn at_least(&mut self, ctx: &Arc<CudaContext>, bytes: usize) -> anyhow::Result<&DeviceBuffer> {
        let bytes = bytes.max(4);
        if self.0.as_ref().is_none_or(|b| b.bytes() < bytes) {
            self.0 = None;
            self.0 = Some(DeviceBuffer::new(ctx, bytes.next_power_of_two())?);
        }
        Ok(self.0.as_ref().expect("allocated above"))
    }
}

impl From<Pooling> for KernelPooling {
    fn from(p: Pooling) -> Self {
        match p {
            Pooling::SoftmaxMean => KernelPooling::SoftmaxMean,
            Pooling::Mean => KernelPooling::Mean,
            Pooling::Max => KernelPooling::Max,
        }
    }
}

impl ScoreBuffers {
    /// Buffers (allocated at first use) and a stream of the thread's own.
    pub fn new(ctx: &Arc<CudaContext>, geo: &Geometry) -> anyhow::Result<Self> {
        Ok(Self {
            stream: ctx.new_stream()?,
            q: Grown(None),
            desc: Grown(None),
            first: Grown(None),
            blocks: Grown(None),
            raw: Grown(None),
            pooled: Grown(None),
            resident: Grown(None),
            plan: Grown(None),
            work: Grown(None),
            host_blocks: Vec::new(),
            host_first: Vec::new(),
            host_resident: Vec::new(),
            host_desc: Vec::new(),
            host_plan: Vec::new(),
            ctx: ctx.clone(),
            geo: *geo,
        })
    }

    /// Selects for every sequence of `jobs` from `mirror`, with `q_rows` (each job's query as
    /// 16-bit `[n_q][d]`, one after the other; a job whose query is read in place from `batch`
    /// has its row copied there on the device): scores, pools and plans every head of every
    /// sequence on the device in one launch each, then reads back the plans of the heads the
    /// jobs ask for into `out` (only the plans cross to the host), and waits for them.
    pub fn select<T: KvElem>(
        &mut self,
        kernels: &Kernels,
        mirror: &DeviceSummaries,
        batch: &CudaBatch,
        jobs: &[PageSelection<'_>],
        q_rows: &[T],
        out: &mut PagePlans,
    ) -> anyhow::Result<()> {
        let (ctx, geo) = (&self.ctx, &self.geo);
        let (n_kv, n_q, n_sel) = (geo.num_kv_heads, geo.num_q_heads(), geo.sel_pages);
        let n_seq = jobs.len();
        let q_len = n_q * geo.head_dim;
        anyhow::ensure!(
            q_rows.len() == n_seq * q_len,
            "page selection of {n_seq} sequences got {} query values",
            q_rows.len()
        );
        if n_seq == 0 {
            out.reset(0, n_sel);
            return Ok(());
        }
        let max_cand = jobs.iter().map(|j| j.blocks.len()).max().unwrap_or(0);
        let stride = max_cand.max(1);
        self.host_blocks.clear();
        self.host_first.clear();
        self.host_resident.clear();
        self.host_desc.clear();
        for (s, job) in jobs.iter().enumerate() {
            anyhow::ensure!(
                job.resident.len() == n_kv * n_sel && job.heads.len() == n_kv,
                "page selection of sequence {s} got {} resident pages and {} heads",
                job.resident.len(),
                job.heads.len()
            );
            if let Some(&b) = job
                .blocks
                .iter()
                .find(|&&b| b as usize >= mirror.num_blocks)
            {
                anyhow::bail!(
                    "candidate block {b} outside the {}-block summaries",
                    mirror.num_blocks
                );
            }
            let last = job.first + job.blocks.len();
            anyhow::ensure!(
                i32::try_from(last).is_ok(),
                "candidate pages up to {last} exceed i32"
            );
            self.host_first.push(job.first as i32);
            self.host_blocks.extend_from_slice(job.blocks);
            self.host_blocks.resize((s + 1) * stride, 0);
            self.host_resident.extend_from_slice(job.resident);
            self.host_desc.push(SeqDesc {
                summaries: mirror.buf.ptr(),
                cand_count: job.blocks.len() as i32,
                ..Default::default()
            });
        }
        let q = self.q.at_least(ctx, std::mem::size_of_val(q_rows))?.ptr();
        let desc = self
            .desc
            .at_least(ctx, n_seq * std::mem::size_of::<SeqDesc>())?
            .ptr();
        let first = self.first.at_least(ctx, n_seq * 4)?.ptr();
        let blocks = self.blocks.at_least(ctx, n_seq * stride * 4)?.ptr();
        let raw = self.raw.at_least(ctx, n_seq * n_q * stride * 4)?.ptr();
        let pooled = self.pooled.at_least(ctx, n_seq * n_kv * stride * 4)?.ptr();
        let resident = self.resident.at_least(ctx, n_seq * n_kv * n_sel * 4)?.ptr();
        let plan_len = n_seq * n_kv * plan_row_len(n_sel);
        let plan = self.plan.at_least(ctx, plan_len * 4)?.ptr();
        let work = self
            .work
            .at_least(ctx, plan_work_bytes(n_seq * n_kv, n_sel))?
            .ptr();
        let s = self.stream.cu_stream();
        // SAFETY: each destination holds its source (sized above); the host vectors outlive
        // the copies (the stream is synchronized below). Block ids are below the mirror's
        // block count (checked) and pages below i32::MAX (checked), so they read as the
        // kernels' i32; NO_PAGE is the plan kernel's empty slot.
        unsafe {
            use cudarc::driver::result::memcpy_htod_async as up;
            up(q, q_rows, s)?;
            up(desc, as_bytes(&self.host_desc), s)?;
            up(first, &self.host_first[..], s)?;
            up(blocks, &self.host_blocks[..], s)?;
            up(resident, &self.host_resident[..], s)?;
        }
        // Queries read in place: the batch's rows, long produced on the engine's stream (the
        // caller read the step's values on the host).
        let q_bytes = q_len * std::mem::size_of::<T>();
        for (i, job) in jobs.iter().enumerate() {
            if let SelectQuery::Batch(row) = job.query {
                anyhow::ensure!(
                    row < batch.rows && batch.q != 0,
                    "a selection's query in row {row} of a {}-row batch",
                    batch.rows
                );
                let (dst, src) = (q + (i * q_bytes) as u64, batch.q + (row * q_bytes) as u64);
                // SAFETY: both rows lie inside their buffers (q holds every job's, the batch
                // every row's); the batch's tensors live until its next load, after this call.
                unsafe { cudarc::driver::result::memcpy_dtod_async(dst, src, q_bytes, s) }?;
            }
        }
        kernels.score_and_pool(
            s,
            &ScoreLaunch {
                q: SeqRows {
                    ptr: q,
                    seq_stride: q_len as i64,
                },
                descs: desc,
                cand_blocks: blocks,
                n_blocks: mirror.num_blocks,
                n_seq,
                n_kv,
                max_cand,
                cand_stride: stride,
                raw,
                pooled,
                pooling: jobs[0].pooling.into(),
            },
        )?;
        kernels.plan_pages(
            s,
            &PlanLaunch {
                pooled,
                descs: desc,
                cand_first: first,
                resident,
                plan,
                work,
                n_seq,
                n_kv,
                cand_stride: stride,
                n_sel,
                sel_k: n_sel,
                slot0: geo.selected_slots().start,
            },
        )?;
        self.host_plan.resize(plan_len, 0);
        // SAFETY: the plan buffer holds at least `plan_len` values; `host_plan` is borrowed
        // until the synchronize.
        unsafe { cudarc::driver::result::memcpy_dtoh_async(&mut self.host_plan, plan, s) }?;
        self.stream.synchronize()?;
        out.read_rows(&self.host_plan, jobs, n_kv, geo.selected_slots())
    }
}
