//! Typed launches of the FreeKV kernels, and the descriptor structs they read.
//!
//! Every launch takes raw device pointers (`u64`) and a raw stream: the pipeline orders its streams
//! with events itself (see `recall.rs`). Launch shapes are fixed here, next to the kernels' own
//! comments in `kernels/*.cu`.

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::{result, sys};

use super::module::LoadedKernels;

/// Per-sequence descriptor of one layer's device tier. Mirrors `struct SeqDesc` in
/// `kernels/common.cuh` (same field order, sizes and alignment: 4 x u64 then 2 x i32 = 40 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SeqDesc {
    /// Device address of the slots `[n_slots][2][page][n_kv][d]` (or a pool of slots, see
    /// `slot_index`).
    pub slots: u64,
    /// `[n_slots][n_kv]` i32: the attended tokens `[lo, hi)` of each logical slot and KV head,
    /// packed as `hi | lo << 16`.
    pub slot_len: u64,
    /// Device address of one layer's page summaries `[n_kv][n_blocks][2][d]`.
    pub summaries: u64,
    /// `[n_slots]` i32: the stored slot of each logical slot (a dense layer's pages in its
    /// pool); 0 = logical slot i is slot i.
    pub slot_index: u64,
    /// Slots attended by decode (sink + selected + window, or a dense layer's pages).
    pub n_slots: i32,
    /// Candidate pages to score.
    pub cand_count: i32,
}

/// Mirrors `struct RecallJob` in `kernels/transfer.cu` (24 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecallJob {
    /// Device address of the destination slots `[n_slots][2][page][n_kv][d]`.
    pub slots: u64,
    /// The chunk's host address as submitted to the pipeline, rewritten to its offset in
    /// elements into the staging buffer for the scatter kernel.
    pub src: u64,
    /// Destination slot.
    pub slot: i32,
    /// Destination KV head.
    pub head: i32,
}

const _: () = assert!(std::mem::size_of::<SeqDesc>() == 40);
const _: () = assert!(std::mem::size_of::<RecallJob>() == 24);

/// Rows of a batch in device memory, one per sequence: the first row's address and the stride
/// between sequences, in elements.
#[derive(Clone, Copy, Debug)]
pub struct SeqRows {
    /// Device address of the first sequence's row.
    pub ptr: u64,
    /// Elements from one sequence's row to the next.
    pub seq_stride: i64,
}

/// The operands of [`Kernels::score_and_pool`].
#[derive(Clone, Copy, Debug)]
pub struct ScoreLaunch {
    /// Each sequence's query `[n_q][d]` (16-bit).
    pub q: SeqRows,
    /// `[n_seq]` [`SeqDesc`]: each sequence's summaries and candidate count.
    pub descs: u64,
    /// `[n_seq][cand_stride]` i32: each candidate's block in the layer's `[n_kv][n_blocks][2][d]`
    /// summaries (`SeqDesc::summaries`).
    pub cand_blocks: u64,
    /// Blocks in the summaries.
    pub n_blocks: usize,
    /// Sequences.
    pub n_seq: usize,
    /// KV heads.
    pub n_kv: usize,
    /// The most candidates of any sequence (sizes the grid).
    pub max_cand: usize,
    /// Row stride of `cand_blocks`, `raw` and `pooled`.
    pub cand_stride: usize,
    /// Scratch for the per-query-head scores `[n_seq][n_q][cand_stride]` f32.
    pub raw: u64,
    /// The pooled scores `[n_seq][n_kv][cand_stride]` f32.
    pub pooled: u64,
    /// How a group's query heads pool into their KV head's score.
    pub pooling: KernelPooling,
}

/// The operands of [`Kernels::plan_pages`]: each (sequence, KV head)'s top-k and replacement
/// plan from its pooled scores, as the CPU backend's `plan_replacement` makes it.
#[derive(Clone, Copy, Debug)]
pub struct PlanLaunch {
    /// The pooled scores `[n_seq][n_kv][cand_stride]` f32 ([`ScoreLaunch::pooled`]).
    pub pooled: u64,
    /// `[n_seq]` [`SeqDesc`]: each sequence's candidate count.
    pub descs: u64,
    /// `[n_seq]` i32: each sequence's first candidate page (candidate `j` is page `first + j`).
    pub cand_first: u64,
    /// `[n_seq][n_kv][n_sel]` u32: the pages the selected slots hold (`u32::MAX`: empty).
    pub resident: u64,
    /// The plans: per (sequence, KV head) a row of `plan_row_len(n_sel)` u32
    /// ([`crate::backend::offload::page_plans`]): the pair count, the margin (f32 bits), then
    /// `(slot, page)` pairs.
    pub plan: u64,
    /// Scratch of [`plan_work_bytes`]`(n_seq * n_kv, n_sel)` bytes.
    pub work: u64,
    /// Sequences.
    pub n_seq: usize,
    /// KV heads.
    pub n_kv: usize,
    /// Row stride of `pooled`.
    pub cand_stride: usize,
    /// Selected slots per KV head.
    pub n_sel: usize,
    /// Pages to select per KV head (at most the candidates).
    pub sel_k: usize,
    /// The first selected slot's index in the working set.
    pub slot0: usize,
}

/// Bytes of [`PlanLaunch::work`] for `rows` (sequence, KV head) rows of `n_sel` slots.
pub fn plan_work_bytes(rows: usize, n_sel: usize) -> usize {
    rows * n_sel * 24
}

/// The operands of [`Kernels::correction`].
#[derive(Clone, Copy, Debug)]
pub struct CorrectionLaunch {
    /// Device array of `2 n_seq` addresses (current, stored) of `[n_q][d]` queries.
    pub queries: u64,
    /// Sequences.
    pub n_seq: usize,
    /// KV heads.
    pub n_kv: usize,
    /// Threshold of the flags: a head whose mean cosine is below it is flagged.
    pub tau: f32,
    /// The cosines `[n_seq][n_kv]` f32.
    pub cos_out: u64,
    /// The flags `[n_seq][n_kv]` i32.
    pub flags: u64,
}

/// The operands of [`Kernels::decode`].
#[derive(Clone, Copy, Debug)]
pub struct DecodeLaunch {
    /// Each sequence's query `[n_q][d]` (16-bit).
    pub q: SeqRows,
    /// `[n_seq]` [`SeqDesc`]: each sequence's slots.
    pub descs: u64,
    /// Sequences.
    pub n_seq: usize,
    /// KV heads.
    pub n_kv: usize,
    /// The most slots any sequence attends (sizes the grid).
    pub max_slots: usize,
    /// Slots per partial chunk.
    pub slots_per_chunk: usize,
    /// Partial outputs: `n_seq * n_q * n_chunks * d` f32.
    pub part_o: u64,
    /// Partial maxima and sums: `n_seq * n_q * n_chunks * 2` f32.
    pub part_ml: u64,
    /// The output `[n_seq][n_q][d]` (16-bit).
    pub out: SeqRows,
    /// Softmax scale.
    pub scale: f32,
    /// Logit soft-cap (0 = none).
    pub softcap: f32,
}

/// Views a slice of plain-old-data descriptors as bytes for uploads.
pub fn as_bytes<T: Copy>(v: &[T]) -> &[u8] {
    // SAFETY: the descriptor types are repr(C) integers without padding (asserted sizes above).
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

/// GQA pooling (`mode` of freekv_pool_scores).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelPooling {
    /// Mean over the group of the softmax over candidates (the paper's default).
    SoftmaxMean = 0,
    /// Mean of the raw scores over the group.
    Mean = 1,
    /// Maximum of the raw scores over the group.
    Max = 2,
}

/// A kernel argument: every parameter of our kernels is one of these.
#[derive(Clone, Copy, Debug)]
pub enum Arg {
    /// A device pointer.
    Ptr(u64),
    /// A 64-bit signed integer.
    I64(i64),
    /// A 32-bit signed integer.
    I32(i32),
    /// A 32-bit float.
    F32(f32),
}

/// Candidates scored per block by freekv_score_pages.
pub const SCORE_PAGES_PER_BLOCK: i32 = 64;

/// The kernels of one configuration on one device, with typed launches.
pub struct Kernels {
    /// The loaded functions and the configuration they were compiled for.
    pub loaded: Arc<LoadedKernels>,
}

impl Kernels {
    /// Typed launches of the kernels in `loaded`.
    pub fn new(loaded: Arc<LoadedKernels>) -> Self {
        Self { loaded }
    }

    fn launch(
        &self,
        name: &str,
        grid: (u32, u32, u32),
        block: u32,
        stream: sys::CUstream,
        args: &[Arg],
    ) -> anyhow::Result<()> {
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
            return Ok(());
        }
        // Each argument gets an 8-byte slot; the driver reads the parameter's own size from the
        // start of its slot (little-endian), so i32/f32 values sit in the low bytes.
        let mut slots: Vec<u64> = args
            .iter()
            .map(|a| match *a {
                Arg::Ptr(v) => v,
                Arg::I64(v) => v as u64,
                Arg::I32(v) => v as u32 as u64,
                Arg::F32(v) => v.to_bits() as u64,
            })
            .collect();
        let mut params: Vec<*mut c_void> = slots
            .iter_mut()
            .map(|s| s as *mut u64 as *mut c_void)
            .collect();
        // SAFETY: the argument list matches the kernel's signature (each wrapper below mirrors the
        // kernel it launches); pointers are device addresses the caller keeps alive.
        unsafe {
            result::launch_kernel(
                self.loaded.function(name),
                grid,
                (block, 1, 1),
                0,
                stream,
                &mut params,
            )
        }
        .map_err(|e| anyhow::anyhow!("launching {name} (grid {grid:?}, block {block}): {e:?}"))
    }

    /// freekv_score_pages + freekv_pool_scores: pooled scores `[n_seq][n_kv][cand_stride]` f32
    /// (see [`ScoreLaunch`]).
    pub fn score_and_pool(&self, stream: sys::CUstream, l: &ScoreLaunch) -> anyhow::Result<()> {
        let blocks = (l.max_cand as u32).div_ceil(SCORE_PAGES_PER_BLOCK as u32);
        self.launch(
            "freekv_score_pages",
            (blocks, l.n_kv as u32, l.n_seq as u32),
            128,
            stream,
            &[
                Arg::Ptr(l.q.ptr),
                Arg::I64(l.q.seq_stride),
                Arg::Ptr(l.descs),
                Arg::Ptr(l.cand_blocks),
                Arg::I32(l.n_blocks as i32),
                Arg::Ptr(l.raw),
                Arg::I32(l.n_kv as i32),
                Arg::I32(l.cand_stride as i32),
                Arg::I32(SCORE_PAGES_PER_BLOCK),
            ],
        )?;
        self.launch(
            "freekv_pool_scores",
            (l.n_kv as u32, l.n_seq as u32, 1),
            256,
            stream,
            &[
                Arg::Ptr(l.raw),
                Arg::Ptr(l.descs),
                Arg::Ptr(l.pooled),
                Arg::I32(l.n_kv as i32),
                Arg::I32(l.cand_stride as i32),
                Arg::I32(l.pooling as i32),
            ],
        )
    }

    /// freekv_plan_pages: each (sequence, KV head)'s top-k and replacement plan from its
    /// pooled scores (see [`PlanLaunch`]).
    pub fn plan_pages(&self, stream: sys::CUstream, l: &PlanLaunch) -> anyhow::Result<()> {
        let as_i32 = |what: &str, v: usize| {
            i32::try_from(v).map_err(|_| anyhow::anyhow!("page planning: {what} {v} exceeds i32"))
        };
        self.launch(
            "freekv_plan_pages",
            (l.n_kv as u32, l.n_seq as u32, 1),
            256,
            stream,
            &[
                Arg::Ptr(l.pooled),
                Arg::Ptr(l.descs),
                Arg::Ptr(l.cand_first),
                Arg::Ptr(l.resident),
                Arg::Ptr(l.plan),
                Arg::Ptr(l.work),
                Arg::I32(as_i32("KV heads", l.n_kv)?),
                Arg::I32(as_i32("candidate stride", l.cand_stride)?),
                Arg::I32(as_i32("selected slots", l.n_sel)?),
                Arg::I32(as_i32("pages to select", l.sel_k)?),
                Arg::I32(as_i32("first selected slot", l.slot0)?),
            ],
        )
    }

    /// freekv_correction: cos `[n_seq][n_kv]` f32 and flags `[n_seq][n_kv]` i32 of each
    /// sequence's current query against its stored one (see [`CorrectionLaunch`]).
    pub fn correction(&self, stream: sys::CUstream, l: &CorrectionLaunch) -> anyhow::Result<()> {
        self.launch(
            "freekv_correction",
            (l.n_kv as u32, l.n_seq as u32, 1),
            128,
            stream,
            &[
                Arg::Ptr(l.queries),
                Arg::I32(l.n_kv as i32),
                Arg::F32(l.tau),
                Arg::Ptr(l.cos_out),
                Arg::Ptr(l.flags),
            ],
        )
    }

    /// freekv_recall_scatter: staging chunks -> NHD slots.
    pub fn recall_scatter(
        &self,
        stream: sys::CUstream,
        staging: u64,
        jobs: u64,
        n_jobs: usize,
        n_kv: usize,
    ) -> anyhow::Result<()> {
        self.launch(
            "freekv_recall_scatter",
            (n_jobs as u32, 1, 1),
            256,
            stream,
            &[
                Arg::Ptr(staging),
                Arg::Ptr(jobs),
                Arg::I32(n_jobs as i32),
                Arg::I32(n_kv as i32),
            ],
        )
    }

    /// Decode attention: freekv_decode_partial over chunks of `slots_per_chunk` slots, then
    /// freekv_decode_combine into `out` (see [`DecodeLaunch`]).
    pub fn decode(&self, stream: sys::CUstream, l: &DecodeLaunch) -> anyhow::Result<()> {
        let n_chunks = l.max_slots.div_ceil(l.slots_per_chunk.max(1)).max(1);
        let (n_kv, n_seq) = (l.n_kv, l.n_seq);
        self.launch(
            "freekv_decode_partial",
            (n_chunks as u32, n_kv as u32, n_seq as u32),
            128,
            stream,
            &[
                Arg::Ptr(l.q.ptr),
                Arg::I64(l.q.seq_stride),
                Arg::Ptr(l.descs),
                Arg::Ptr(l.part_o),
                Arg::Ptr(l.part_ml),
                Arg::I32(n_kv as i32),
                Arg::I32(n_chunks as i32),
                Arg::I32(l.slots_per_chunk as i32),
                Arg::F32(l.scale),
                Arg::F32(l.softcap),
            ],
        )?;
        let n_q = n_kv * self.loaded.config.group;
        self.launch(
            "freekv_decode_combine",
            (n_q as u32, n_seq as u32, 1),
            self.loaded.config.head_dim as u32,
            stream,
            &[
                Arg::Ptr(l.part_o),
                Arg::Ptr(l.part_ml),
                Arg::Ptr(l.out.ptr),
                Arg::I64(l.out.seq_stride),
                Arg::I32(n_kv as i32),
                Arg::I32(n_chunks as i32),
            ],
        )
    }

    /// Chunking for decode: enough blocks to fill the device (about 2 per SM), at least 2 slots
    /// per block.
    pub fn decode_slots_per_chunk(
        n_seq: usize,
        n_kv: usize,
        max_slots: usize,
        sm_count: usize,
    ) -> usize {
        let target_blocks = (2 * sm_count).max(1);
        let per_head = target_blocks.div_ceil((n_seq * n_kv).max(1)).max(1);
        max_slots.div_ceil(per_head).max(2)
    }
}
