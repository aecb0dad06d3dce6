//! The FreeKV operations a device provides, behind one trait (candle-style: the algorithm in
//! `timeline.rs` and `prefill.rs` is written once against [`Backend`]; each
//! device's code lives in its own folder: [`cpu`] here (the working set read in place), and
//! [`offload`], the working set in a device's own memory, for any [`offload::DeviceOps`]: host
//! memory or CUDA (`backend/cuda/`).
//!
//! The trait splits along the spec's operations: write pages (+ summarise), maintain the
//! working set, score/select, recall, attend. Storage is opaque (associated types); what
//! crosses the boundary is plain: page ranges, per-head masks, counts. Selection results stay
//! inside the device tier as a per-head recall plan (slot, page), FlashInfer-style plain
//! arrays, so a device can keep them in its own memory.
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

/// The FreeKV operations of one device, for one model geometry and storage dtype.
///
/// Conventions: `table` is a sequence's block table (page `j` lives in block `table[j]`);
/// `row` indexes the batch loaded by the last `load_*` call; `heads` is a per-KV-head mask.
pub trait Backend: Send + Sync + 'static {
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

    // ---- allocation -------------------------------------------------------------------
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

    // ---- inputs and outputs -----------------------------------------------------------
    /// Loads a decode step: q `(B, Hq, D)`, k/v `(B, Hkv, D)`; clears the output.
    fn load_decode(
        &self,
        batch: &mut Self::Batch,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> anyhow::Result<()>;
    /// Loads a prompt batch: q `(B, Hq, L, D)`, k/v `(B, Hkv, L, D)`. With `last_only =
    /// Some(new_lens)` only each row's last query is kept (no output will be computed).
    fn load_prefill(
        &self,
        batch: &mut Self::Batch,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        last_only: Option<&[usize]>,
    ) -> anyhow::Result<()>;
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

    // ---- write pages ------------------------------------------------------------------
    /// Writes `n` tokens of batch row `row` (batch token `j` goes to position `first_pos + j`)
    /// into the host tier and summarises every page that becomes full. Any write into a
    /// block invalidates its old summary (block ids are reused across sequences). A decode
    /// token that does not fill its page may be written later ([`Backend::settle`]).
    #[allow(clippy::too_many_arguments)]
    fn write_tokens(
        &self,
        host: &mut Self::HostTier,
        table: &[u32],
        batch: &mut Self::Batch,
        row: usize,
        first_pos: usize,
        n: usize,
        scratch: &mut Self::Scratch,
    ) -> anyhow::Result<()>;
    /// Summarises the first `full_pages` pages of a sequence where their summary is missing
    /// (prefix-cache hits, rebuilds). Returns how many were computed.
    fn ensure_summaries(
        &self,
        host: &mut Self::HostTier,
        table: &[u32],
        full_pages: usize,
        scratch: &mut Self::Scratch,
    ) -> anyhow::Result<usize>;

    // ---- working set ------------------------------------------------------------------
    /// Whether a sequence within the budget on a retrieving layer attends over its working set
    /// holding every page ([`Backend::hold_every_page`]; a device whose decode reads its own
    /// memory) rather than over the host tier. Default: no.
    fn holds_short_contexts(&self) -> bool {
        false
    }
    /// Makes the working set of a sequence of `len` tokens (within the budget; the last token
    /// just written from batch row `row`) hold every page: page `j` in its sink or window slot,
    /// or in selectable slot `j - sink_pages`. Only for a backend that
    /// [holds short contexts](Backend::holds_short_contexts).
    #[allow(clippy::too_many_arguments)]
    fn hold_every_page(
        &self,
        _host: &Self::HostTier,
        _table: &[u32],
        _dev: &mut Self::DeviceTier,
        _len: usize,
        _batch: &Self::Batch,
        _row: usize,
    ) -> anyhow::Result<RecallStats> {
        anyhow::bail!("this backend attends short contexts over the host tier")
    }
    /// Installs the sink and window pages of a sequence of `len` tokens, as the host tier holds
    /// them, and empties the selected slots. (A decode step then moves its window forward,
    /// which places its token however [`Backend::write_tokens`] wrote it.)
    fn reset_working_set(
        &self,
        host: &Self::HostTier,
        table: &[u32],
        dev: &mut Self::DeviceTier,
        len: usize,
    ) -> anyhow::Result<RecallStats>;
    /// The sequence grew to `len` tokens (the last one written from batch row `row`): moves
    /// the window forward.
    fn advance_window(
        &self,
        table: &[u32],
        dev: &mut Self::DeviceTier,
        len: usize,
        batch: &Self::Batch,
        row: usize,
    ) -> anyhow::Result<()>;
    /// Stores the query of batch row `row`, token `token` (0 for decode) as the sequence's
    /// current query: selections use it, the next step's drift test compares against it.
    fn store_query(
        &self,
        dev: &mut Self::DeviceTier,
        batch: &mut Self::Batch,
        row: usize,
        token: usize,
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

    // ---- score / select ---------------------------------------------------------------
    /// Scores the selection's candidate pages with the stored query (by its selector: the
    /// Quest bound with GQA pooling; the rerank, whose shortlist by the page summaries is
    /// scored by its tokens' exact attention weight; or the oracle's exact attention mass),
    /// takes the exact top-k per KV head in `heads` and plans the replacement: winners already resident stay,
    /// missing winners go into the lowest-scored selected slots. The plan is applied by
    /// [`Backend::recall`].
    fn select(
        &self,
        host: &Self::HostTier,
        table: &[u32],
        dev: &mut Self::DeviceTier,
        selection: &Selection,
        heads: &[bool],
        scratch: &mut Self::Scratch,
    ) -> anyhow::Result<()>;

    // ---- recall -----------------------------------------------------------------------
    /// Applies the pending plan of the heads in `heads`: brings the missing pages into their
    /// slots.
    fn recall(
        &self,
        host: &Self::HostTier,
        table: &[u32],
        dev: &mut Self::DeviceTier,
        heads: &[bool],
        scratch: &mut Self::Scratch,
    ) -> anyhow::Result<RecallStats>;

    /// The logical pages KV head `head` attends over now (sorted; for traces and tests).
    fn resident_pages(
        &self,
        dev: &Self::DeviceTier,
        head: usize,
        len: usize,
    ) -> anyhow::Result<Vec<u32>>;

    // ---- diagnostics ------------------------------------------------------------------
    /// Batch row `row`'s query (a decode step's), `[n_q][d]` in f32, into `out` (the
    /// selection probe; the host waits for the step's values where they are on a device).
    fn read_query(
        &self,
        batch: &mut Self::Batch,
        row: usize,
        out: &mut Vec<f32>,
    ) -> anyhow::Result<()>;
    /// KV head `head`'s keys of a sequence's first `len` tokens as the host tier holds them,
    /// `[len][d]` in f32, into `out` (the selection probe, after [`Backend::settle`]).
    fn read_keys(
        &self,
        host: &Self::HostTier,
        table: &[u32],
        len: usize,
        head: usize,
        out: &mut Vec<f32>,
    ) -> anyhow::Result<()>;

    // ---- attend -----------------------------------------------------------------------
    /// Decode attention of batch row `row` (query at position `len - 1`) over the working
    /// set `dev`, or over every page of the sequence when `dev` is `None`; writes the row's
    /// output into the batch.
    #[allow(clippy::too_many_arguments)]
    fn attend_decode(
        &self,
        host: &mut Self::HostTier,
        table: &[u32],
        len: usize,
        dev: Option<&Self::DeviceTier>,
        batch: &mut Self::Batch,
        row: usize,
        params: &AttnParams,
        scratch: &mut Self::Scratch,
    ) -> anyhow::Result<()>;
    /// Causal prefill attention of batch row `row`: its `new_len` queries (positions
    /// `cached_len..`) over the host-tier keys `0..=position`; writes the row's output.
    #[allow(clippy::too_many_arguments)]
    fn attend_prefill(
        &self,
        host: &Self::HostTier,
        table: &[u32],
        cached_len: usize,
        new_len: usize,
        batch: &mut Self::Batch,
        row: usize,
        params: &AttnParams,
        scratch: &mut Self::Scratch,
    ) -> anyhow::Result<()>;
}
