//! The device memory of one (sequence, layer) working set ([`CudaSlots`]): the slots (sink +
//! selected + window, NHD `[slot][k/v][p][n_kv][d]`, the layout the host-memory device and the
//! kernels share), O(budget) and allocated once; and the decode
//! kernels' partials ([`DecodeBuffers`]). The page summaries are per layer, not per sequence
//! (`super::scoring`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaStream};

use crate::geometry::Geometry;

use super::kernels::{Kernels, SeqDesc};
use super::mem::DeviceBuffer;
use super::recall::RawEvent;

/// Geometry shared by all layers of a sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TierShape {
    /// KV heads.
    pub n_kv: usize,
    /// Query heads per KV head.
    pub group: usize,
    /// Elements per head vector.
    pub head_dim: usize,
    /// Tokens per page (one page per slot).
    pub page_size: usize,
    /// Slots of the tier: budget / page_size for a working set, the pool's blocks for a dense
    /// layer.
    pub n_slots: usize,
    /// Bytes per element.
    pub elem_bytes: usize,
}

impl TierShape {
    /// Elements of one slot: the keys and values of one page for every KV head.
    pub fn slot_elems(&self) -> usize {
        2 * self.page_size * self.n_kv * self.head_dim
    }
    /// Bytes of one slot.
    pub fn slot_bytes(&self) -> usize {
        self.slot_elems() * self.elem_bytes
    }
    /// Device bytes of a [`CudaSlots`] of this shape.
    pub fn bytes(&self) -> usize {
        self.n_slots * self.slot_bytes()
    }
}

/// One layer of one sequence on the device: its slots. Which tokens of each slot a decode
/// attends is the host's slot table, staged with each decode's descriptor.
pub struct CudaSlots {
    /// The geometry of the slots.
    pub shape: TierShape,
    /// The slots, `n_slots` of `slot_bytes()` bytes each.
    pub slots: DeviceBuffer,
    /// Recorded on the engine's stream after each decode over the slots or append into them
    /// that may still be queued: a move into the slots (another stream) waits on it first, and
    /// the slots are freed only once it has completed.
    pub last_use: Arc<RawEvent>,
    /// Recorded by the recall pipeline once the last move into the slots has landed: the
    /// engine's stream waits on it before it reads or writes them (decode, append), the next
    /// move waits on it before it writes them, and the slots are freed only once it has fired.
    pub filled: Arc<RawEvent>,
    /// A move was queued since the engine's stream last waited for `filled`.
    moved: AtomicBool,
}

impl CudaSlots {
    /// Slots with unspecified contents: a decode reads only the tokens its staged spans name,
    /// which a move or an append wrote first.
    pub fn new(ctx: &Arc<CudaContext>, shape: TierShape) -> anyhow::Result<Self> {
        Ok(Self {
            shape,
            slots: DeviceBuffer::new(ctx, shape.n_slots * shape.slot_bytes())?,
            last_use: Arc::new(RawEvent::new(ctx)?),
            filled: Arc::new(RawEvent::new(ctx)?),
            moved: AtomicBool::new(false),
        })
    }

    /// Notes a move queued into the slots (recorded in `filled`).
    pub fn note_move(&self) {
        self.moved.store(true, Ordering::Release);
    }

    /// Orders `stream` (the engine's) after the moves queued into the slots since it last was:
    /// one wait per move, not one per decode row and append.
    pub fn after_moves(&self, stream: cudarc::driver::sys::CUstream) -> anyhow::Result<()> {
        if self.moved.swap(false, Ordering::AcqRel) {
            if let Err(e) = self.filled.wait_on(stream) {
                self.note_move();
                return Err(e);
            }
        }
        Ok(())
    }

    /// The decode kernels' view of this layer: its first `n_slots` slots (the token spans and
    /// any slot index are staged with the launch, see `CudaBatch::stage_decode`).
    pub fn desc(&self, n_slots: usize) -> SeqDesc {
        SeqDesc {
            slots: self.slots.ptr(),
            n_slots: n_slots as i32,
            ..Default::default()
        }
    }
}

/// The shape of a tier of `n_slots` slots of a geometry with 16-bit elements.
pub fn tier_shape(geo: &Geometry, n_slots: usize) -> TierShape {
    TierShape {
        n_kv: geo.num_kv_heads,
        group: geo.group,
        head_dim: geo.head_dim,
        page_size: geo.page_size,
        n_slots,
        elem_bytes: 2,
    }
}

impl Drop for CudaSlots {
    fn drop(&mut self) {
        // Queued decodes and appends may still read or write the slots, and a move write them.
        let _ = self.last_use.synchronize();
        let _ = self.filled.synchronize();
    }
}

/// The decode kernels' partials for one row at a time (the rows of a call run one after
/// another on the engine's stream), allocated on first use and grown to the largest call.
pub struct DecodeBuffers {
    ctx: Arc<CudaContext>,
    /// The stream their decodes are queued on (waited for before they are freed).
    stream: Arc<CudaStream>,
    sm_count: usize,
    /// Partial outputs `[n_q][n_chunks][d]` f32.
    pub part_o: DeviceBuffer,
    /// Partial max and sum `[n_q][n_chunks][2]` f32.
    pub part_ml: DeviceBuffer,
}

impl DecodeBuffers {
    /// Buffers for `geo` on a device with `sm_count` multiprocessors, sized for a working set.
    pub fn new(
        ctx: &Arc<CudaContext>,
        geo: &Geometry,
        sm_count: usize,
        stream: &Arc<CudaStream>,
    ) -> anyhow::Result<Self> {
        let mut bufs = Self {
            ctx: ctx.clone(),
            stream: stream.clone(),
            sm_count,
            part_o: DeviceBuffer::new(ctx, 0)?,
            part_ml: DeviceBuffer::new(ctx, 0)?,
        };
        bufs.prepare(geo, 1, geo.slots)?;
        Ok(bufs)
    }

    /// The slots per decode block of a launch for `n_seq` rows over at most `max_slots`
    /// logical slots each, with the buffers grown to hold its partials (after the earlier
    /// decodes using them have run).
    pub fn prepare(
        &mut self,
        geo: &Geometry,
        n_seq: usize,
        max_slots: usize,
    ) -> anyhow::Result<usize> {
        let (n_q, n_kv, d) = (geo.num_q_heads(), geo.num_kv_heads, geo.head_dim);
        let slots_per_chunk =
            Kernels::decode_slots_per_chunk(n_seq, n_kv, max_slots, self.sm_count);
        let n_chunks = max_slots.div_ceil(slots_per_chunk.max(1)).max(1);
        let partials = n_seq * n_q * n_chunks;
        let (o_bytes, ml_bytes) = (partials * d * 4, partials * 2 * 4);
        if self.part_o.bytes() < o_bytes || self.part_ml.bytes() < ml_bytes {
            self.stream.synchronize()?;
            self.part_o = DeviceBuffer::new(&self.ctx, o_bytes.max(self.part_o.bytes()))?;
            self.part_ml = DeviceBuffer::new(&self.ctx, ml_bytes.max(self.part_ml.bytes()))?;
        }
        Ok(slots_per_chunk)
    }
}

impl Drop for DecodeBuffers {
    fn drop(&mut self) {
        // Queued decodes may still use the partials.
        let _ = self.stream.synchronize();
    }
}
