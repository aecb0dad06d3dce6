//! Page scoring on a CUDA device: one layer's mirror of the host tier's page summaries
//! ([`DeviceSummaries`], `[n_kv][block][upper d | lower d]`, written as pages fill) and one
//! thread's buffers for a scoring call ([`ScoreBuffers`]: the query, the candidates' blocks,
//! raw and pooled scores), on that thread's own stream.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaStream};

use crate::backend::cpu::elem::KvElem;
use crate::backend::cpu::host_tier::HostTier;
use crate::geometry::Geometry;

use super::kernels::{as_bytes, KernelPooling, Kernels, ScoreLaunch, SeqDesc, SeqRows};
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

/// One thread's scoring buffers, grown to the largest candidate count seen.
pub struct ScoreBuffers {
    /// The thread's own stream, on which its scoring calls run.
    pub stream: Arc<CudaStream>,
    q: DeviceBuffer,
    desc: DeviceBuffer,
    blocks: DeviceBuffer,
    raw: DeviceBuffer,
    pooled: DeviceBuffer,
    /// Candidates the buffers hold.
    cap: usize,
    ctx: Arc<CudaContext>,
    geo: Geometry,
}

impl ScoreBuffers {
    /// Buffers (for no candidates yet) and a stream of the thread's own.
    pub fn new(ctx: &Arc<CudaContext>, geo: &Geometry) -> anyhow::Result<Self> {
        Ok(Self {
            stream: ctx.new_stream()?,
            q: DeviceBuffer::new(ctx, geo.num_q_heads() * geo.head_dim * 2)?,
            desc: DeviceBuffer::new(ctx, std::mem::size_of::<SeqDesc>())?,
            blocks: DeviceBuffer::new(ctx, 4)?,
            raw: DeviceBuffer::new(ctx, 4)?,
            pooled: DeviceBuffer::new(ctx, 4)?,
            cap: 0,
            ctx: ctx.clone(),
            geo: *geo,
        })
    }

    /// Scores the `blocks` candidates with `q_rows` (`[n_q][d]`, 16-bit) from `mirror`,
    /// pooled per KV head, into `out` (`[n_kv][blocks.len()]`), and waits for the result.
    pub fn score<T: KvElem>(
        &mut self,
        kernels: &Kernels,
        mirror: &DeviceSummaries,
        blocks: &[u32],
        q_rows: &[T],
        pooling: KernelPooling,
        out: &mut [f32],
    ) -> anyhow::Result<()> {
        let n = blocks.len();
        let (ctx, geo) = (&self.ctx, &self.geo);
        let (n_kv, n_q) = (geo.num_kv_heads, geo.num_q_heads());
        anyhow::ensure!(
            out.len() == n_kv * n && std::mem::size_of_val(q_rows) == self.q.bytes(),
            "page scoring of {n} candidates got a {}-value output and a {}-byte query",
            out.len(),
            std::mem::size_of_val(q_rows)
        );
        if let Some(&b) = blocks.iter().find(|&&b| b as usize >= mirror.num_blocks) {
            anyhow::bail!(
                "candidate block {b} outside the {}-block summaries",
                mirror.num_blocks
            );
        }
        if n == 0 {
            return Ok(());
        }
        if n > self.cap {
            let cap = n.next_power_of_two();
            self.blocks = DeviceBuffer::new(ctx, cap * 4)?;
            self.raw = DeviceBuffer::new(ctx, n_q * cap * 4)?;
            self.pooled = DeviceBuffer::new(ctx, n_kv * cap * 4)?;
            self.cap = cap;
        }
        let desc = [SeqDesc {
            summaries: mirror.buf.ptr(),
            cand_count: n as i32,
            ..Default::default()
        }];
        let s = self.stream.cu_stream();
        // SAFETY: the host slices outlive the copies: the stream is synchronized below. Block
        // ids are below the mirror's block count (checked), so they read as the kernel's i32.
        unsafe {
            self.q.copy_from_host_async(0, q_rows, s)?;
            self.desc.copy_from_host_async(0, as_bytes(&desc), s)?;
            self.blocks.copy_from_host_async(0, blocks, s)?;
        }
        // Row stride `n`: the pooled rows come back as one `[n_kv][n]` block.
        kernels.score_and_pool(
            s,
            &ScoreLaunch {
                q: SeqRows {
                    ptr: self.q.ptr(),
                    seq_stride: 0,
                },
                descs: self.desc.ptr(),
                cand_blocks: self.blocks.ptr(),
                n_blocks: mirror.num_blocks,
                n_seq: 1,
                n_kv,
                max_cand: n,
                cand_stride: n,
                raw: self.raw.ptr(),
                pooled: self.pooled.ptr(),
                pooling,
            },
        )?;
        // SAFETY: `out` is exactly the first n_kv * n pooled scores (checked above, and the
        // buffer holds n_kv * cap >= that); it is borrowed until the synchronize.
        unsafe { cudarc::driver::result::memcpy_dtoh_async(out, self.pooled.ptr(), s) }?;
        self.stream.synchronize()?;
        Ok(())
    }
}
