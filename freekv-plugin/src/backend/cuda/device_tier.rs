//! The device memory of one (sequence, layer) working set ([`LayerTier`]): the slots (sink +
//! selected + window, NHD `[slot][k/v][p][n_kv][d]`, the layout the host-memory device and the
//! kernels share), the valid-token table, the selection map, the page summaries and the
//! previous query; and one decode call's buffers ([`DecodeBuffers`]).
//!
//! Everything but the summaries is O(budget) and allocated once; the summaries (1/16 of the keys)
//! grow with the context by doubling.

use std::sync::Arc;

use cudarc::driver::{result, sys, CudaContext};

use crate::geometry::Geometry;

use super::kernels::{Kernels, SeqDesc};
use super::mem::DeviceBuffer;

/// Geometry shared by all layers of a sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TierShape {
    pub n_kv: usize,
    pub group: usize,
    pub head_dim: usize,
    pub page_size: usize,
    /// Slots per layer: budget / page_size.
    pub n_slots: usize,
    /// Selectable slots are [sel_slot0, sel_slot0 + n_sel).
    pub sel_slot0: usize,
    pub n_sel: usize,
    pub elem_bytes: usize,
}

impl TierShape {
    pub fn slot_elems(&self) -> usize {
        2 * self.page_size * self.n_kv * self.head_dim
    }
    pub fn slot_bytes(&self) -> usize {
        self.slot_elems() * self.elem_bytes
    }
    pub fn summary_bytes_per_page(&self) -> usize {
        self.n_kv * 2 * self.head_dim * self.elem_bytes
    }
    pub fn q_bytes(&self) -> usize {
        self.n_kv * self.group * self.head_dim * self.elem_bytes
    }
}

/// One layer of one sequence on the device.
pub struct LayerTier {
    pub shape: TierShape,
    pub slots: DeviceBuffer,
    pub slot_len: DeviceBuffer,
    pub sel_pages: DeviceBuffer,
    pub summaries: DeviceBuffer,
    pub summary_capacity: usize,
    pub q_prev: DeviceBuffer,
}

impl LayerTier {
    pub fn new(
        ctx: &Arc<CudaContext>,
        shape: TierShape,
        summary_capacity: usize,
    ) -> anyhow::Result<Self> {
        let sel_pages = DeviceBuffer::new(ctx, shape.n_kv * shape.n_sel.max(1) * 4)?;
        // 0xff bytes: every i32 is -1 (empty).
        // SAFETY: the range is the allocation.
        unsafe { result::memset_d8_sync(sel_pages.ptr(), 0xff, sel_pages.bytes()) }?;
        Ok(Self {
            shape,
            slots: DeviceBuffer::zeroed(ctx, shape.n_slots * shape.slot_bytes())?,
            slot_len: DeviceBuffer::zeroed(ctx, shape.n_slots * shape.n_kv * 4)?,
            sel_pages,
            summaries: DeviceBuffer::zeroed(
                ctx,
                summary_capacity.max(1) * shape.summary_bytes_per_page(),
            )?,
            summary_capacity: summary_capacity.max(1),
            q_prev: DeviceBuffer::zeroed(ctx, shape.q_bytes())?,
        })
    }

    pub fn slot_ptr(&self, slot: usize) -> u64 {
        self.slots.ptr() + (slot * self.shape.slot_bytes()) as u64
    }

    pub fn summary_ptr(&self, page: usize) -> u64 {
        self.summaries.ptr() + (page * self.shape.summary_bytes_per_page()) as u64
    }

    /// The kernels' view of this layer for one step.
    pub fn desc(&self, n_slots: usize, cand_begin: usize, cand_count: usize) -> SeqDesc {
        SeqDesc {
            slots: self.slots.ptr(),
            slot_len: self.slot_len.ptr(),
            summaries: self.summaries.ptr(),
            sel_pages: self.sel_pages.ptr(),
            n_slots: n_slots as i32,
            sel_slot0: self.shape.sel_slot0 as i32,
            cand_begin: cand_begin as i32,
            cand_count: cand_count as i32,
        }
    }

    /// Makes room for `pages` summaries (doubling), copying the old ones on `stream`.
    pub fn ensure_summary_capacity(
        &mut self,
        ctx: &Arc<CudaContext>,
        pages: usize,
        stream: sys::CUstream,
    ) -> anyhow::Result<()> {
        if pages <= self.summary_capacity {
            return Ok(());
        }
        let cap = pages.max(2 * self.summary_capacity);
        let bigger = DeviceBuffer::zeroed(ctx, cap * self.shape.summary_bytes_per_page())?;
        // SAFETY: both ranges lie inside their allocations.
        unsafe {
            result::memcpy_dtod_async(
                bigger.ptr(),
                self.summaries.ptr(),
                self.summaries.bytes(),
                stream,
            )
        }?;
        // SAFETY: the old buffer must outlive the copy.
        unsafe { result::stream::synchronize(stream) }?;
        self.summaries = bigger;
        self.summary_capacity = cap;
        Ok(())
    }

    /// Device bytes held by this layer: KV slots (the budget) and everything else.
    pub fn device_bytes(&self) -> (usize, usize) {
        let kv = self.slots.bytes();
        let other = self.slot_len.bytes()
            + self.sel_pages.bytes()
            + self.summaries.bytes()
            + self.q_prev.bytes();
        (kv, other)
    }
}

/// The device-tier shape of a geometry with 16-bit elements.
pub fn tier_shape(geo: &Geometry) -> TierShape {
    TierShape {
        n_kv: geo.num_kv_heads,
        group: geo.group,
        head_dim: geo.head_dim,
        page_size: geo.page_size,
        n_slots: geo.slots,
        sel_slot0: geo.sink_pages,
        n_sel: geo.sel_pages,
        elem_bytes: 2,
    }
}

/// Device bytes of one [`LayerTier`] of `shape` (with room for one summary page, which this
/// backend does not use: summaries stay in the host tier).
pub fn layer_tier_bytes(shape: &TierShape) -> usize {
    shape.n_slots * shape.slot_bytes()
        + shape.n_slots * shape.n_kv * 4
        + shape.n_kv * shape.n_sel.max(1) * 4
        + shape.summary_bytes_per_page()
        + shape.q_bytes()
}

/// Device buffers of one decode call (one sequence), allocated on first use.
pub struct DecodeBuffers {
    /// The query, `[n_q][d]` 16-bit.
    pub q: DeviceBuffer,
    /// One [`SeqDesc`].
    pub desc: DeviceBuffer,
    /// Partial outputs `[n_q][n_chunks][d]` f32.
    pub part_o: DeviceBuffer,
    /// Partial max and sum `[n_q][n_chunks][2]` f32.
    pub part_ml: DeviceBuffer,
    /// The output, `[n_q][d]` 16-bit.
    pub out: DeviceBuffer,
    /// Slots per decode block.
    pub slots_per_chunk: usize,
    /// Decode blocks per KV head (chunks of `slots_per_chunk` slots).
    pub n_chunks: usize,
}

impl DecodeBuffers {
    /// Buffers for `geo` on a device with `sm_count` multiprocessors.
    pub fn new(ctx: &Arc<CudaContext>, geo: &Geometry, sm_count: usize) -> anyhow::Result<Self> {
        let n_q = geo.num_q_heads();
        let d = geo.head_dim;
        let slots_per_chunk =
            Kernels::decode_slots_per_chunk(1, geo.num_kv_heads, geo.slots, sm_count);
        let n_chunks = geo.slots.div_ceil(slots_per_chunk.max(1)).max(1);
        Ok(Self {
            q: DeviceBuffer::new(ctx, n_q * d * 2)?,
            desc: DeviceBuffer::new(ctx, std::mem::size_of::<SeqDesc>())?,
            part_o: DeviceBuffer::new(ctx, n_q * n_chunks * d * 4)?,
            part_ml: DeviceBuffer::new(ctx, n_q * n_chunks * 2 * 4)?,
            out: DeviceBuffer::new(ctx, n_q * d * 2)?,
            slots_per_chunk,
            n_chunks,
        })
    }
}
