//! The raw device calls of the offload design, behind [`DeviceMemory`] (allocation, sizes,
//! uploads of host-computed data) and [`DeviceOps`] (a step's work): what a device must do
//! for FreeKV's working set and page selection to live in its own memory (a device's plans
//! must be the CPU backend's `plan_replacement` of the same scores). Everything above this
//! interface (slot tables, which summaries to mirror when, which chunks move where as the
//! plans say, when attention may run on the device) is
//! [`OffloadBackend`](super::OffloadBackend)'s, written once for every device.

use std::ops::Range;

use candle_core::{DType, Device, Tensor};

use crate::backend::cpu::elem::KvElem;
use crate::backend::cpu::host_tier::HostTier;
use crate::backend::Role;
use crate::geometry::Geometry;
use crate::{AttnParams, Pooling};

use super::page_plans::PagePlans;

/// Most chunks a device stages per copy buffer when it moves chunks (the CUDA recall pipeline
/// has two such buffers of `2 * page_size * head_dim` elements per chunk).
#[cfg_attr(not(any(feature = "engine", feature = "cuda")), allow(dead_code))]
pub const STAGED_CHUNKS_PER_BUFFER: usize = 256;

/// One chunk to move: KV head `head`'s K+V of host block `block` (HND, one page) into that
/// head's slice of working-set slot `slot` (NHD).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkMove {
    pub block: u32,
    pub head: u32,
    pub slot: u32,
}

/// Packs the attended tokens `[lo, hi)` of one slot for [`DeviceOps::decode`]: `hi` in the
/// low 16 bits, `lo` in the high 16 bits (pages hold at most 32 tokens).
pub fn token_span(lo: usize, hi: usize) -> i32 {
    debug_assert!(lo <= hi && hi <= 0xffff);
    if lo >= hi {
        0
    } else {
        ((lo << 16) | hi) as i32
    }
}

/// The tokens `[lo, hi)` of a span packed by [`token_span`].
pub fn span_tokens(span: i32) -> (usize, usize) {
    let s = span.max(0) as usize;
    (s >> 16, s & 0xffff)
}

/// The runs of consecutive values in `rows` (sorted ascending), as index ranges into `rows`:
/// the batch rows one decode launch can serve (its `s`-th descriptor is its `s`-th row).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub fn consecutive_runs(rows: &[usize]) -> Vec<Range<usize>> {
    let mut runs = Vec::new();
    let mut start = 0;
    for i in 1..=rows.len() {
        if i == rows.len() || rows[i] != rows[i - 1] + 1 {
            runs.push(start..i);
            start = i;
        }
    }
    runs
}

/// The rows of a decode step for `geo`: q `(B, Hq, D)`, k and v `(B, Hkv, D)`; an error names
/// the tensor whose shape differs.
pub fn decode_rows(geo: &Geometry, q: &Tensor, k: &Tensor, v: &Tensor) -> anyhow::Result<usize> {
    let (n_q, n_kv, d) = (geo.num_q_heads(), geo.num_kv_heads, geo.head_dim);
    let b = q.dims().first().copied().unwrap_or(0);
    for (name, t, heads) in [("q", q, n_q), ("k", k, n_kv), ("v", v, n_kv)] {
        anyhow::ensure!(
            t.dims() == [b, heads, d],
            "decode {name} of shape {:?}; expected ({b}, {heads}, {d})",
            t.dims()
        );
    }
    Ok(b)
}

/// Where an appended token's K and V rows come from.
pub enum NewToken<'a, T, B> {
    /// Rows in host memory, `[n_kv][d]` each, as stored.
    Host { k: &'a [T], v: &'a [T] },
    /// Row `row` of a decode batch loaded by [`DeviceOps::load_batch`], read where the engine
    /// produced it.
    Batch { batch: &'a B, row: usize },
}

/// The memory of a device for the offload design, for one model geometry (fixed at
/// construction) and KV stored as `T`: what it allocates, how much, and the plain copies of
/// host-computed data into it (page summaries, stored queries). See [`DeviceOps`] for the
/// ordering rules every call follows.
pub trait DeviceMemory<T: KvElem>: Send + Sync + 'static {
    /// Slot data: one (sequence, layer) working set, or a dense layer's pages (one slot per
    /// block of the pool).
    type Slots: Send;
    /// Per-thread device memory (staging, decode buffers), allocated lazily.
    type Scratch: Send;
    /// What keeps a host tier's pages registered with the device (page-locked for its copy
    /// engines) until it is dropped, before the pages are.
    type HostPin: Send;
    /// One layer's page summaries in device memory: a mirror of the host tier's
    /// (`[n_kv][block][upper d | lower d]`), written by [`DeviceOps::upload_summaries`] only.
    type Summaries: Send;
    /// One decode call's q, k and v, read where the engine produced them (on its device), and
    /// the call's output, in the device's memory.
    type Batch: Send;
    /// A decode call's q, k and v on their way to host memory: a copy that runs behind the
    /// call's device work and is waited for only when the host reads it.
    type Staged: Send;
    /// One (sequence, layer)'s stored query on the device (`[n_q][d]`, zero when allocated):
    /// what the next step's correction test compares against.
    type Query: Send;

    /// Where the engine's tensors live and outputs are returned.
    fn device(&self) -> &Device;
    /// Background worker threads by default (see `Memory::default_workers`): one where the
    /// device's work runs on the host's cores.
    fn default_workers(&self) -> usize {
        1
    }
    /// Allocates `n_slots` slots (contents unspecified).
    fn alloc_slots(&self, n_slots: usize) -> anyhow::Result<Self::Slots>;
    /// Bytes of `n_slots` slots (and the device's own tables for them).
    fn slots_bytes(&self, n_slots: usize) -> usize;
    /// Per-thread memory for a thread of `role`.
    fn alloc_scratch(&self, role: Role) -> Self::Scratch;
    /// Registers a newly allocated host tier's pages with the device (page-locks them). Best
    /// effort: None where the system refuses (or there are no pages); copies then work from
    /// pageable memory, more slowly, and the device says so in its log.
    fn pin_host(&self, pages: &[T]) -> Option<Self::HostPin>;

    /// An empty decode batch.
    fn alloc_batch(&self) -> Self::Batch;

    /// Allocates the summary mirror of a pool of `num_blocks` blocks (contents zero).
    fn alloc_summaries(&self, num_blocks: usize) -> anyhow::Result<Self::Summaries>;
    /// Bytes of the summary mirror of `num_blocks` blocks.
    fn summaries_bytes(&self, num_blocks: usize) -> usize;
    /// Copies the host tier's summaries of `blocks` (every KV head; sorted, distinct) into the
    /// mirror.
    fn upload_summaries(
        &self,
        host: &HostTier<T>,
        mirror: &mut Self::Summaries,
        blocks: &[u32],
        scratch: &mut Self::Scratch,
    ) -> anyhow::Result<()>;

    /// Allocates a stored query (zero).
    fn alloc_query(&self) -> anyhow::Result<Self::Query>;
    /// Bytes of device memory a stored query takes.
    fn query_bytes(&self) -> usize;
    /// Writes `query` (`[n_q][d]` f32, the host's copy of the stored query) into `dst`, in
    /// order before any later correction test that reads it (on the engine's stream: the test
    /// is queued there too).
    fn upload_query(&self, query: &[f32], dst: &mut Self::Query) -> anyhow::Result<()>;
}

/// Where a selection's query is read.
#[derive(Clone, Copy, Debug)]
pub enum SelectQuery<'a> {
    /// `[n_q][d]` f32 on the host (the stored query).
    Host(&'a [f32]),
    /// The query of this row of the decode batch, in place (the stored query was taken from
    /// it; the caller has read the batch's values on the host, so the device produced them).
    Batch(usize),
}

/// One sequence's selection for [`DeviceOps::select_pages`]: the candidates, the query, and
/// the pages each head's selected slots hold.
#[derive(Clone, Copy, Debug)]
pub struct PageSelection<'a> {
    /// The candidate pages' blocks in the summaries: candidate `j` is page `first + j`.
    pub blocks: &'a [u32],
    /// The first candidate's page.
    pub first: usize,
    /// The query.
    pub query: SelectQuery<'a>,
    /// The KV heads to plan (the others' plans are left empty).
    pub heads: &'a [bool],
    /// How a group's query heads pool into their KV head's score.
    pub pooling: Pooling,
    /// `[n_kv][sel_pages]`: the page each head's selected slot holds ([`NO_PAGE`]: empty).
    ///
    /// [`NO_PAGE`]: crate::geometry::NO_PAGE
    pub resident: &'a [u32],
}

/// The device operations of one model geometry (fixed at construction) for KV stored as `T`.
///
/// Slot data is token-major: `[slot][k/v][page_size][n_kv][head_dim]` (the layout the CUDA
/// kernels read). Ordering: work that reads or writes a decode batch ([`DeviceOps::decode`],
/// an append from the batch, its copy to the host [`DeviceOps::stage_batch`]) may stay
/// queued in order with the engine's own work on its device (the engine's stream); the tensor
/// [`DeviceOps::finish_batch`] returns is valid in that order. A move into slots
/// ([`DeviceOps::move_chunks`]) may stay queued too: the device orders it after every queued
/// read or write of those slots and before every later one, whichever thread makes it. Any
/// other call returns once its work is complete and its inputs may be reused. The device frees
/// slots only once their queued work is done, and releases a host tier's pages (its `HostPin`,
/// dropped before the pages) only once no queued move reads them, so no call races with
/// another. A failure is an error; the caller names the
/// operation it served.
pub trait DeviceOps<T: KvElem>: DeviceMemory<T> {
    /// Loads a decode step in place: q `(B, Hq, D)`, k and v `(B, Hkv, D)` (tensors of any
    /// float dtype on [`DeviceOps::device`]; read without a copy where their dtype is `T`'s),
    /// and allocates its `(B, Hq, D)` output.
    fn load_batch(
        &self,
        batch: &mut Self::Batch,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> anyhow::Result<()>;
    /// Starts copying the loaded batch's q, k and v to host memory, after the device work
    /// that produced them; returns without waiting for it. `reuse` is an earlier copy whose
    /// memory may serve again (read, or no longer needed).
    fn stage_batch(
        &self,
        batch: &Self::Batch,
        reuse: Option<Self::Staged>,
    ) -> anyhow::Result<Self::Staged>;
    /// Waits for a staged copy and returns its q `(B, Hq, D)`, k and v `(B, Hkv, D)` as host
    /// tensors (in the KV dtype, or the engine's where that is wider).
    fn read_staged(&self, staged: &Self::Staged) -> anyhow::Result<[Tensor; 3]>;
    /// The loaded batch's output in `dtype`: each row as [`DeviceOps::decode`] wrote it, except
    /// the rows listed in `host_rows`, which the host computed: those are taken from
    /// `host_out` (`[B][n_q][d]` f32; empty where no row was).
    fn finish_batch(
        &self,
        batch: &mut Self::Batch,
        host_rows: &[usize],
        host_out: &[f32],
        dtype: DType,
    ) -> anyhow::Result<Tensor>;
    /// Selects pages from the mirror for each sequence of `jobs` and each KV head `h` of its
    /// `heads`: the Quest bound of every query head of the group against the summary of each
    /// candidate, pooled over the group, then the top `sel_pages` and the replacement plan of
    /// the head's selected slots, exactly as the CPU backend's `plan_replacement` makes them
    /// from those pooled scores, into `out` (job `i`'s head `h` at `i * n_kv + h`). A job's
    /// query is read from the host or in place from `batch` ([`SelectQuery`]). Returns once
    /// `out` is written (only the plans come back from the device; one wait for all jobs).
    fn select_pages(
        &self,
        mirror: &Self::Summaries,
        batch: &Self::Batch,
        jobs: &[PageSelection<'_>],
        out: &mut PagePlans,
        scratch: &mut Self::Scratch,
    ) -> anyhow::Result<()>;
    /// The correction test of a decode batch: for each `(row, stored)` of `rows`, per KV head
    /// the mean over its group of cos(row's query, stored query), each cosine clamped to
    /// `[-1, 1]` and 1 where either vector is zero, into `out[i * n_kv + head]`. The query is
    /// read where the engine produced it; only the similarities come back (one wait for the
    /// device per call).
    fn query_similarities(
        &self,
        batch: &mut Self::Batch,
        rows: &[(usize, &Self::Query)],
        out: &mut [f32],
    ) -> anyhow::Result<()>;

    /// Copies each move's whole host chunk into its slot, ordered after the slots' earlier
    /// work and before their later work on the device. It may return before the copies have
    /// run: a chunk may be read until the slots are next used, so a token written into it
    /// meanwhile may or may not be copied (the callers append every such token again). `scratch` is the calling
    /// thread's (None where the caller has none: a working-set reset).
    fn move_chunks(
        &self,
        host: &HostTier<T>,
        slots: &mut Self::Slots,
        moves: &[ChunkMove],
        scratch: Option<&mut Self::Scratch>,
    ) -> anyhow::Result<()>;

    /// [`DeviceOps::move_chunks`] into several slot sets at once, each set's moves in order:
    /// one request to the device where it can take them together (a layer-step's recalls of
    /// every sequence). Default: one call per set.
    fn move_chunks_into_sets(
        &self,
        host: &HostTier<T>,
        sets: &mut [SlotMoves<'_, Self::Slots>],
        mut scratch: Option<&mut Self::Scratch>,
    ) -> anyhow::Result<()> {
        for set in sets.iter_mut() {
            self.move_chunks(host, set.slots, set.moves, scratch.as_deref_mut())?;
        }
        Ok(())
    }

    /// Writes one token's K and V rows of every KV head at `token` of `slot`.
    fn append_token(
        &self,
        slots: &mut Self::Slots,
        slot: usize,
        token: usize,
        rows: NewToken<'_, T, Self::Batch>,
    ) -> anyhow::Result<()>;

    /// Decode attention of each row of `rows` (one launch for the call where the device can):
    /// the query of batch row `row` (one position) over logical slots: with no `index`, the
    /// working set's slots themselves; with one, logical slot `i` is stored in slot
    /// `index[i]` (a dense layer's pages in its pool). `slot_len[i * n_kv + head]` says which
    /// tokens of each logical slot the head attends, as [`token_span`]: `[lo, hi)` (`lo > 0`
    /// where a sliding window starts inside the page; 0: empty); the softcap, when set, is
    /// positive, and `params.sliding_window` is not read. Writes each row's output in the
    /// batch.
    fn decode(
        &self,
        rows: &[DecodeDesc<'_, Self::Slots>],
        batch: &mut Self::Batch,
        params: &AttnParams,
        scratch: &mut Self::Scratch,
    ) -> anyhow::Result<()>;
}

/// One slot set's chunks of a [`DeviceOps::move_chunks_into_sets`] call.
pub struct SlotMoves<'a, S> {
    /// The slots the chunks go into.
    pub slots: &'a mut S,
    /// The chunks, in order.
    pub moves: &'a [ChunkMove],
}

/// One row of a [`DeviceOps::decode`] call.
pub struct DecodeDesc<'a, S> {
    /// The slots it reads.
    pub slots: &'a S,
    /// Where each logical slot is stored (`None`: logical slot `i` is slot `i`).
    pub index: Option<&'a [u32]>,
    /// `[logical slot][n_kv]` attended tokens, packed by [`token_span`].
    pub slot_len: &'a [i32],
    /// The batch row whose query attends.
    pub row: usize,
}

#[cfg(test)]
mod tests {
    use super::consecutive_runs;

    #[test]
    fn a_launch_serves_each_run_of_consecutive_rows() {
        assert!(consecutive_runs(&[]).is_empty());
        assert_eq!(consecutive_runs(&[0, 1, 2, 3]), vec![0..4]);
        assert_eq!(consecutive_runs(&[5]), vec![0..1]);
        // Row 2 attended on the host: two launches.
        assert_eq!(consecutive_runs(&[0, 1, 3, 4, 7]), vec![0..2, 2..4, 4..5]);
        // Every row is in exactly one run, in order.
        let rows = [1, 2, 4, 6, 7, 8, 10];
        let runs = consecutive_runs(&rows);
        let covered: Vec<usize> = runs.iter().flat_map(|r| rows[r.clone()].to_vec()).collect();
        assert_eq!(covered, rows);
        for r in &runs {
            assert!(rows[r.clone()].windows(2).all(|w| w[1] == w[0] + 1));
        }
    }
}
