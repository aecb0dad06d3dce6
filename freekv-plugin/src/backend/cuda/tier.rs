//! The storage types of the CUDA [`Backend`](crate::backend::Backend): the working set of one
//! (sequence, layer), per-thread scratch and one call's batch.
//!
//! The bookkeeping (per-head slot tables, pending plans, stored query) is the CPU backend's
//! [`CpuDeviceTier`] in its table-only form, so every table decision is made by the same code as
//! on CPU; the slot *data* lives on the device in a [`LayerTier`] (NHD, `[slot][k/v][p][n_kv][d]`,
//! the layout the CPU copy tier and the kernels share).

use std::sync::Arc;

use cudarc::driver::CudaContext;

use crate::backend::cpu::device_tier::CpuDeviceTier;
use crate::backend::cpu::elem::KvElem;
use crate::backend::cpu::io::CpuBatch;
use crate::backend::cpu::CpuScratch;
use crate::geometry::Geometry;

use super::device_tier::{LayerTier, TierShape};
use super::kernels::{Kernels, SeqDesc};
use super::mem::DeviceBuffer;

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

/// The working set of one (sequence, layer): tables on the host, slot data on the device.
pub struct CudaDeviceTier<T> {
    /// Slot tables, pending plans and the stored query (table-only CPU tier).
    pub tables: CpuDeviceTier<T>,
    /// Slot data and the valid-token table the decode kernel reads.
    pub gpu: LayerTier,
}

impl<T: KvElem> CudaDeviceTier<T> {
    /// An empty working set (all slots empty) with its device memory allocated.
    pub fn new(ctx: &Arc<CudaContext>, geo: Geometry) -> anyhow::Result<Self> {
        Ok(Self {
            tables: CpuDeviceTier::new(geo, false),
            gpu: LayerTier::new(ctx, tier_shape(&geo), 1)?,
        })
    }

    /// The decode kernel's descriptor of this working set.
    pub fn desc(&self) -> SeqDesc {
        self.gpu.desc(self.gpu.shape.n_slots, 0, 0)
    }
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

/// Per-thread working memory.
pub struct CudaScratch<T: KvElem> {
    /// The CPU backend's scratch, for the operations that run on the host.
    pub cpu: CpuScratch<T>,
    /// Decode buffers on the device (the caller thread's only).
    pub decode: Option<DecodeBuffers>,
    /// Host staging of the valid-token table `[n_slots][n_kv]`.
    pub slot_len: Vec<i32>,
    /// Host staging of 16-bit rows (query in, output back).
    pub rows: Vec<T>,
    /// Host staging of the output as f32.
    pub out: Vec<f32>,
}

/// One call's q/k/v and output, on the host (the engine's tensors are copied over once).
#[derive(Default)]
pub struct CudaBatch {
    /// The CPU backend's batch (f32 rows).
    pub cpu: CpuBatch,
}
