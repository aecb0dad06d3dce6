//! The FreeKV operations a device provides, behind one trait (candle-style: the algorithm in
//! `timeline.rs` and `prefill.rs` is written once against [`Backend`]; each
//! device's code lives in its own folder: [`cpu`] here (the working set read in place), and
//! [`offload`], the working set in a device's own memory, for any [`offload::DeviceOps`]: host
//! memory or CUDA (`backend/cuda/`).
//!
//! Two traits, as candle splits a device from its storage ops: [`Memory`] allocates and sizes
//! a device's memory; [`Backend`] runs the spec's operations on it: load a call, write pages
//! (+ summarise), arrange the working set, store the query, the correction test, select (+
//! recall), attend, take the output. Storage is opaque (associated types); what crosses the
//! boundary is plain: the step's rows ([`WriteRow`], [`AttendRow`]: tables, positions,
//! lengths), per-head masks, counts. The operations that serve every row of a call (write,
//! the correction test, attend) take all of them at once, as [`crate::step_plan::StepPlan`]
//! lists them, so a device runs each as one batch (one kernel launch per layer). Selection
//! results stay inside the device tier as its [`SlotPlan`] (slot tables and a per-head recall
//! plan, FlashInfer-style plain arrays), the one slot layout of every device.
//!
//! Calls for one layer are serialised by the caller (one lock per layer); a backend may run
//! calls for different layers concurrently (the decode thread and the background worker).
//!
//! Every operation that touches storage is fallible, as candle's backend storage ops are: a
//! device error or an exhausted memory fails the call (and the request it serves) with a
//! message naming the operation; the caller keeps its locks usable and its other sequences
//! intact (see `crate::instance`).

use std::ops::Range;

use candle_core::{DType, Tensor};

use crate::geometry::Geometry;
use crate::plan::SlotPlan;
use crate::{AttnParams, Selector};

pub mod cpu;
pub mod offload;

/// What a recall moved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecallStats {
    /// (page, KV head) chunks that entered a working set.
    pub pages: usize,
    /// Bytes copied (0 when a recall only updates tables).
    pub bytes: usize,
}

impl std::ops::AddAssign for RecallStats {
    fn add_assign(&mut self, o: Self) {
        self.pages += o.pages;
        self.bytes += o.bytes;
    }
}

/// One selection: over which pages, for which context, scored how.
#[derive(Clone, Debug, PartialEq)]
pub struct Selection {
    /// The candidate pages (see [`Geometry::candidates`]).
    pub candidates: Range<usize>,
    /// The context of the stored query: the sequence's tokens when the query was stored (on a
    /// device that writes a step's token to the host tier after the step, the last may still
    /// be on its way; candidates never include it).
    pub len: usize,
    /// The layer's attention parameters (the softmax of the oracle and of the rerank).
    pub params: AttnParams,
    /// How pages are scored.
    pub selector: Selector,
    /// Selector `rerank`: pages shortlisted per selected page.
    pub shortlist: usize,
}

/// Which thread a scratch area serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The engine's calling thread (critical path).
    Caller,
    /// The background selection + recall worker.
    Worker,
}

/// A device's memory for FreeKV, for one model geometry and storage dtype: what it allocates
/// and how much.
pub trait Memory: Send + Sync + 'static {
    /// One layer's host tier: the KV pages of every engine block (HND) and their summaries.
    type HostTier: Send;
    /// One (sequence, layer) device tier: budget-sized slots with per-head slot tables, the
    /// stored query of the last step and the pending recall plan.
    type DeviceTier: Send;
    /// Per-thread working memory, reused between calls.
    type Scratch: Send;
    /// One call's q/k/v (loaded from the engine's tensors) and output, reused between calls.
    type Batch: Send;

    /// The geometry this backend was built for.
    fn geometry(&self) -> &Geometry;
    /// Allocates one layer's host tier for `num_blocks` engine blocks (fallible). `scored`:
    /// whether selection will score the layer's pages (false for a dense layer).
    fn alloc_host_tier(&self, num_blocks: usize, scored: bool) -> anyhow::Result<Self::HostTier>;
    /// Allocates one (sequence, layer) device tier, all slots empty.
    fn alloc_device_tier(&self) -> anyhow::Result<Self::DeviceTier>;
    /// Allocates a scratch area for a thread.
    fn alloc_scratch(&self, role: Role) -> Self::Scratch;
    /// An empty batch.
    fn alloc_batch(&self) -> Self::Batch;
    /// Bytes of one layer's host tier for `num_blocks` blocks (KV and summaries).
    fn host_tier_bytes(&self, num_blocks: usize) -> usize;
    /// Bytes of one (sequence, layer) device tier.
    fn device_tier_bytes(&self) -> usize;
    /// Bytes a layer keeps in device memory for a pool of `num_blocks` blocks, whatever the
    /// sequences: for a scored layer the device's mirror of the page summaries, for a dense
    /// one (not `scored`) its pages; 0 where both are read from the host tier.
    fn device_pool_bytes(&self, num_blocks: usize, scored: bool) -> usize;
    /// Decode calls so far that waited for their own device work before returning their
    /// output (the decode critical path's host synchronisations); 0 for a backend without a
    /// device.
    fn device_waits(&self) -> u64 {
        0
    }
    /// Host tiers (one per layer) the device could not page-lock, whose recalls copy from
    /// pageable memory at a lower bandwidth; 0 for a backend without a device.
    fn unpinned_host_tiers(&self) -> u64 {
        0
    }
    /// Whether a sequence within the budget on a retrieving layer attends over its working set
    /// holding every page ([`Arrange::HoldEvery`]; a device whose decode reads its own
    /// memory) rather than over the host tier. Default: no.
    fn holds_short_contexts(&self) -> bool {
        false
    }
    /// Background worker threads where the configuration leaves it to the backend
    /// (`workers = 0`): one on the CPU, whose workers compute on the cores the engine uses.
    fn default_workers(&self) -> usize {
        1
    }
    /// The slot tables of a working set (which logical page each slot of each head holds).
    fn slot_plan(dev: &Self::DeviceTier) -> &SlotPlan;
}

/// The tensors a call loads.
#[derive(Clone, Copy)]
pub enum Inputs<'a> {
    /// A decode step: q `(B, Hq, D)`, k/v `(B, Hkv, D)`.
    Decode {
        /// The queries.
        q: &'a Tensor,
        /// The new keys.
        k: &'a Tensor,
        /// The new values.
        v: &'a Tensor,
    },
    /// A prompt batch: q `(B, Hq, L, D)`, k/v `(B, Hkv, L, D)`. With `last_only =
    /// Some(new_lens)` only each row's last query is kept (no output will be computed).
    Prefill {
        /// The queries.
        q: &'a Tensor,
        /// The new keys.
        k: &'a Tensor,
        /// The new values.
        v: &'a Tensor,
        /// Each row's new tokens, when only its last query is kept.
        last_only: Option<&'a [usize]>,
    },
}

/// One row's writes of a call: batch tokens `0..n` of row `row` go to positions
/// `first_pos..first_pos + n` of the sequence whose block table is `table`.
#[derive(Clone, Copy, Debug)]
pub struct WriteRow<'a> {
    /// The sequence's block table (covering the written positions).
    pub table: &'a [u32],
    /// The batch row.
    pub row: usize,
    /// Position of the row's first token.
    pub first_pos: usize,
    /// Tokens written.
    pub n: usize,
    /// Full pages from the first whose summaries must exist after the write (a prompt, a
    /// rebuilt context: pages a prefix cache or an earlier sequence filled); 0: only the
    /// pages the write fills are summarised.
    pub summarised_pages: usize,
}

/// How a working set changes for its sequence's step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arrange {
    /// Install the sink and window pages as the host tier holds them and empty the selected
    /// slots.
    Reset,
    /// The sequence grew by the token of batch row `row`: move the window forward.
    Advance {
        /// The batch row whose token was written last.
        row: usize,
    },
    /// Hold every page of a context within the budget (the last token written from batch
    /// row `row`): page `j` in its sink or window slot, or in selectable slot
    /// `j - sink_pages`. Only for a backend that
    /// [holds short contexts](Memory::holds_short_contexts).
    HoldEvery {
        /// The batch row whose token was written last.
        row: usize,
    },
    /// [`Arrange::Reset`], then [`Arrange::Advance`]: a sparse step without a selection (the
    /// first, or a rebuild) installs the sink and window afresh, the step's token included.
    Fresh {
        /// The batch row whose token was written last.
        row: usize,
    },
}

/// One working set of [`Backend::arrange`].
pub struct ArrangeRow<'a, D> {
    /// The sequence's block table.
    pub table: &'a [u32],
    /// Its working set.
    pub dev: &'a mut D,
    /// Its context length.
    pub len: usize,
    /// How the working set changes.
    pub how: Arrange,
}

/// One query of [`Backend::store_query`]: batch row `row`'s, token `token` (0 for decode), into
/// the working set `dev`.
pub struct StoreQuery<'a, D> {
    /// The sequence's working set.
    pub dev: &'a mut D,
    /// The batch row.
    pub row: usize,
    /// The token of the row (0 for decode).
    pub token: usize,
}

/// One sequence's selection of [`Backend::select`]: the heads in `heads` select over the
/// candidates of `selection` with the query stored in `dev`.
pub struct SelectRow<'a, D> {
    /// The sequence's block table.
    pub table: &'a [u32],
    /// Its working set.
    pub dev: &'a mut D,
    /// What to select.
    pub selection: Selection,
    /// The KV heads that select.
    pub heads: &'a [bool],
    /// The row of the layer's loaded decode step whose query the stored query is (stored from
    /// it at this step), if any: a device may read it there, in place.
    pub query_row: Option<usize>,
}

/// One row's decode attention: the query of batch row `row` (position `len - 1`) over the
/// working set `dev`, or over every page of the sequence when `dev` is `None`.
pub struct AttendRow<'a, D> {
    /// The sequence's block table.
    pub table: &'a [u32],
    /// Its context (the step's token included).
    pub len: usize,
    /// The working set it attends over, if any.
    pub dev: Option<&'a D>,
    /// The batch row.
    pub row: usize,
}

/// One row's causal prefill attention: its `new_len` queries (positions `cached_len..`) over
/// the host-tier keys `0..=position`.
#[derive(Clone, Copy, Debug)]
pub struct CausalRow<'a> {
    /// The sequence's block table.
    pub table: &'a [u32],
    /// Tokens cached before the call.
    pub cached_len: usize,
    /// Tokens the call adds.
    pub new_len: usize,
    /// The batch row.
    pub row: usize,
}

/// Which attention a call computes, for which rows.
pub enum Attend<'a, D> {
    /// One query per row, over a working set or every page.
    Decode(&'a [AttendRow<'a, D>]),
    /// Each row's new queries, causally.
    Prefill(&'a [CausalRow<'a>]),
}

/// What a diagnostic read returns (the selection probe), `f32` into its buffer.
#[derive(Clone, Copy, Debug)]
pub enum Read<'a> {
    /// Batch row `row`'s query of a decode step, `[n_q][d]` (the host waits for the step's
    /// values where they are on a device).
    Query {
        /// The batch row.
        row: usize,
    },
    /// KV head `head`'s keys of a sequence's first `len` tokens as the host tier holds them,
    /// `[len][d]` (after [`Backend::settle`]).
    Keys {
        /// The sequence's block table.
        table: &'a [u32],
        /// Tokens read.
        len: usize,
        /// The KV head.
        head: usize,
    },
}

/// The FreeKV operations of one device, on the memory its [`Memory`] allocates.
///
/// Conventions: `table` is a sequence's block table (page `j` lives in block `table[j]`);
/// `row` indexes the batch loaded by the last [`Backend::load`]; `heads` is a per-KV-head mask.
pub trait Backend: Memory {
    /// Loads a call's tensors into `batch`; clears the output.
    fn load(&self, batch: &mut Self::Batch, inputs: Inputs<'_>) -> anyhow::Result<()>;
    /// The attention output of the loaded batch, shaped like its q, in `dtype`.
    fn take_output(&self, batch: &mut Self::Batch, dtype: DType) -> anyhow::Result<Tensor>;
    /// Completes the host-tier writes a backend deferred from the last decode step of this
    /// layer (`batch` is still that step's). A backend whose device produces the step's
    /// values may write a token into the host tier after the step, so that the step need not
    /// wait for the device; the caller settles a layer before it loads the layer's next call,
    /// and the worker before its selection. Until then only the step's own operations read
    /// the host tier, and they see the tokens they need. Default: nothing is deferred.
    fn settle(
        &self,
        _host: &mut Self::HostTier,
        _batch: &mut Self::Batch,
        _scratch: &mut Self::Scratch,
    ) -> anyhow::Result<()> {
        Ok(())
    }
    /// Writes every row's tokens into the host tier and summarises every page that becomes
    /// full (and the first [`WriteRow::summarised_pages`] where missing). Any write into a
    /// block invalidates its old summary (block ids are reused across sequences). A decode
    /// token that does not fill its page may be written later ([`Backend::settle`]).
    fn write(
        &self,
        host: &mut Self::HostTier,
        batch: &mut Self::Batch,
        rows: &[WriteRow<'_>],
        scratch: &mut Self::Scratch,
    ) -> anyhow::Result<()>;
    /// Arranges each row's working set (of a sequence of `len` tokens, within the budget for
    /// [`Arrange::HoldEvery`]) for its step. Returns what entered each, in row order.
    fn arrange(
        &self,
        host: &Self::HostTier,
        rows: &mut [ArrangeRow<'_, Self::DeviceTier>],
        batch: &Self::Batch,
    ) -> anyhow::Result<Vec<RecallStats>>;
    /// Stores each row's query as its sequence's current query: selections use it, the next
    /// step's drift test compares against it.
    fn store_query(
        &self,
        rows: &mut [StoreQuery<'_, Self::DeviceTier>],
        batch: &mut Self::Batch,
    ) -> anyhow::Result<()>;
    /// The correction test of a decode call: for each `(row, working set)` of `rows`, per KV
    /// head the mean over its group of cos(batch query of `row`, stored query), each cosine
    /// clamped to `[-1, 1]` and 1 where either query is zero, into `out[i * n_kv + head]`.
    fn query_similarities(
        &self,
        rows: &[(usize, &Self::DeviceTier)],
        batch: &mut Self::Batch,
        out: &mut [f32],
    ) -> anyhow::Result<()>;
    /// For each row: scores the selection's candidate pages with the stored query (by its
    /// selector: the Quest bound with GQA pooling; the rerank, whose shortlist by the page
    /// summaries is scored by its tokens' exact attention weight; or the oracle's exact
    /// attention mass), takes the exact top-k per KV head in `heads`, plans the replacement
    /// (winners already resident stay, missing winners go into the lowest-scored selected
    /// slots) and recalls the missing pages into their slots. Returns what each recall moved,
    /// in row order. `batch` is the layer's loaded call, whose query rows a device may read in
    /// place of the stored queries they equal (`SelectRow::query_row`).
    fn select(
        &self,
        host: &Self::HostTier,
        rows: &mut [SelectRow<'_, Self::DeviceTier>],
        batch: &Self::Batch,
        scratch: &mut Self::Scratch,
    ) -> anyhow::Result<Vec<RecallStats>>;
    /// The attention of every row of `job`, written into the batch's output.
    fn attend(
        &self,
        host: &mut Self::HostTier,
        batch: &mut Self::Batch,
        job: Attend<'_, Self::DeviceTier>,
        params: &AttnParams,
        scratch: &mut Self::Scratch,
    ) -> anyhow::Result<()>;
    /// A diagnostic read (the selection probe) into `out`.
    fn read(
        &self,
        host: &Self::HostTier,
        batch: &mut Self::Batch,
        what: Read<'_>,
        out: &mut Vec<f32>,
    ) -> anyhow::Result<()>;
}
