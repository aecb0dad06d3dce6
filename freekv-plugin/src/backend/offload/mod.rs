//! The offload design: the working set of every (sequence, layer) in a device's own memory,
//! token-major (NHD), the full KV in the host tier, head-major (HND), as the paper lays them
//! out. [`OffloadBackend`] implements [`Backend`] once for every such device; the device itself
//! is a [`DeviceOps`]: CUDA (`crate::cuda::ops`, feature `cuda`) or host memory ([`host`], which
//! is how CI runs this orchestration against the CPU backend without a GPU, and the CPU's
//! `--freekv-device-tier copy` layout).
//!
//! Division of labour:
//! - host tier, summaries and the slot tables: the CPU backend's code on the host;
//! - the correction test (mode `freekv`): on the device, each row's query read in place against
//!   the sequence's stored query, mirrored on the device whenever the plan's is stored
//!   ([`DeviceOps::query_similarities`]); only the similarities come back, one wait per call;
//! - page selection (selector `quest`): on the device, from a mirror of the summaries that
//!   follows the host tier (each summary uploaded when its page fills or is re-summarised):
//!   scoring, pooling, the top-k and the replacement plan of each head's selected slots, the
//!   CPU backend's plan exactly ([`DeviceOps::select_pages`]); only the plans come back (one
//!   small read on the calling thread's own stream, as the authors' worker reads its recall
//!   list), and the host moves the chunks they name.
//!   Selectors that read keys (`rerank`: its shortlist's tokens; `oracle`: every token, after
//!   the step's tokens are settled into the host tier) run the CPU backend's selection on the
//!   host tier;
//! - working-set resets and recalls: the plan's chunks moved by the device
//!   ([`DeviceOps::move_chunks`]); the tables follow the data;
//! - each new token: appended to its window slot on the device from the engine's tensors; its
//!   host-tier copy is written from the step's values copied to host memory behind the step
//!   (`DeviceOps::stage_batch`), after the step ([`Backend::settle`]: by the worker, or at the
//!   layer's next call), a page it fills summarised and mirrored then (it is still in the
//!   window). So a decode step waits for the device only for the correction test's
//!   similarities and where the host needs the step's values: a selection on the critical path
//!   (a first sparse step, a corrected head, mode `sync`) and host-attended rows;
//! - a dense layer's pages: mirrored in the device's memory too (one slot per block of the
//!   pool, written as the host tier is; `dense_pages`), so its decode runs on the device;
//! - a sequence within the budget on a retrieving layer: its working set holds every page
//!   ([`Backend::hold_every_page`], `whole`: each page copied once, each token appended);
//! - decode attention over a working set or a dense layer's pages, sliding windows included:
//!   on the device; FreeKV's prefill attention too, each query a decode row over the pages up
//!   to its position (`prompt`: a dense layer's pages, or the row's pages copied from the host
//!   tier for the call; the host attends a row whose copy does not fit).

mod decode;
mod dense_pages;
pub mod emulated;
mod inputs;
pub mod ops;
pub mod page_plans;
mod prompt;
mod selection;
mod staged;
mod whole;

use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context;
use candle_core::{DType, Tensor};

use crate::backend::cpu::elem::KvElem;
use crate::backend::cpu::host_tier::HostTier;
use crate::backend::cpu::io::CpuBatch;
use crate::backend::cpu::{CpuBackend, CpuScratch};
use crate::backend::{
    Arrange, ArrangeRow, Attend, Backend, Inputs, Memory, Read, RecallStats, Role, SelectRow,
    StoreQuery, WriteRow,
};
use crate::geometry::{Geometry, NO_PAGE};
use crate::plan::SlotPlan;
use crate::{AttnParams, FreeKvConfig, Pooling};

pub use ops::{
    token_span, ChunkMove, DecodeDesc, DeviceMemory, DeviceOps, NewToken, PageSelection,
    SelectQuery, SlotMoves,
};
pub use page_plans::PagePlans;
use prompt::DevicePrompt;

/// [`Backend`] for a device whose working sets live in its own memory.
pub struct OffloadBackend<T: KvElem, O> {
    cpu: CpuBackend<T>,
    geo: Geometry,
    pooling: Pooling,
    ops: O,
    /// Decode calls that read their own values on the host before their output was taken.
    step_waits: AtomicU64,
    /// Host tiers (layers) the device could not page-lock: their recalls copy from pageable
    /// memory.
    unpinned: AtomicU64,
    /// Whether the correction test runs (mode `freekv`): the stored query is mirrored on the
    /// device.
    correction: bool,
}

/// The working set of one (sequence, layer): the plan on the host, the slot data on the
/// device.
pub struct OffloadTier<T, S, Q> {
    /// Slot tables, pending replacements and the stored query.
    pub plan: SlotPlan,
    /// The slot data.
    pub slots: S,
    /// The stored query on the device, for the correction test (mode `freekv`; the plan's
    /// copy is what selections read).
    reference: Q,
    /// The new token's K then V rows of every KV head (`2 [n_kv][d]`), reused by each append.
    new_token: Vec<T>,
    /// While the working set holds every page of a short context: the blocks it holds (the
    /// sequence's table at `held_len` tokens). `held_len` 0: it holds a selection or nothing.
    held: Vec<u32>,
    held_len: usize,
}

/// One layer's host tier, registered with the device while it lives, and what the device
/// mirrors of it: the summaries of a sparse layer, or every page of a dense one.
pub struct OffloadHostTier<T, P, M, S> {
    /// Declared first: unregistered before the pages are freed.
    _pin: Option<P>,
    tier: HostTier<T>,
    /// None for a layer whose pages are never scored (dense).
    summaries: Option<M>,
    /// A dense layer's pages on the device: block `b` in slot `b`. None for a sparse layer
    /// (or a dense one whose pages did not fit: it decodes from the host tier).
    pages: Option<S>,
    /// Per block: its copy in `pages` may differ from the host tier (a copy failed), so
    /// decode over it reads the host tier until a whole-page copy succeeds.
    stale: Vec<bool>,
    /// Decode tokens written to the device but not yet to the host tier: rows of the layer's
    /// last batch ([`Backend::settle`] writes them).
    pending: Vec<PendingToken>,
    /// Blocks summarised in the host tier whose summaries the device's mirror lacks (a copy
    /// failed): copied again with the next summaries, and until then no selection scores them.
    unmirrored: Vec<u32>,
}

/// A decode token whose host-tier write waits for the step's staged values.
#[derive(Clone, Copy, Debug)]
struct PendingToken {
    row: usize,
    block: u32,
    /// Position in its page.
    pos: usize,
}

/// One call's q/k/v and output: a decode step's in the device's batch, read in place, where
/// the device writes each output row it attends, and on their way to host memory; on the host
/// for the host-side work (the host tier, the correction test, FreeKV's prefill), read from
/// that copy when first needed ([`OffloadBackend::host_values`]).
pub struct OffloadBatch<B, S> {
    /// Where the loaded call stands.
    call: Call,
    /// The call's values on the host (and the output of the rows the host attends), once
    /// loaded there (a prompt's at once, a decode step's when first needed).
    host: CpuBatch,
    /// A decode step's values copied towards host memory.
    staged: Option<S>,
    /// A decode step's tensors on the device, and its output.
    pub dev: B,
    /// Rows of a decode step whose output the host computed (in `host.out`).
    host_rows: Vec<usize>,
}

/// The lifecycle of a batch's loaded call.
enum Call {
    /// Nothing loaded (or the last load failed).
    Empty,
    /// A prompt batch, its values on the host; `device`: its tensors on the device for the
    /// device's prefill attention, when its output is wanted.
    Prompt { device: Option<DevicePrompt> },
    /// A decode step on the device.
    Decode {
        /// Its values were read on the host (from `staged`).
        host_loaded: bool,
        /// It waited for the device (counted once in `step_waits`).
        waited: bool,
        /// Its output was taken (so a read of `staged` waits for nothing).
        retired: bool,
    },
}

impl<B, S> OffloadBatch<B, S> {
    /// Whether the loaded call is a decode step on the device.
    fn on_device(&self) -> bool {
        matches!(self.call, Call::Decode { .. })
    }

    /// The loaded prompt's tensors on the device, when the device may attend it.
    fn prompt(&mut self) -> Option<&mut DevicePrompt> {
        match &mut self.call {
            Call::Prompt { device } => device.as_mut(),
            _ => None,
        }
    }
}

/// Per-thread working memory.
pub struct OffloadScratch<T: KvElem, S> {
    cpu: CpuScratch<T>,
    device: S,
    moves: Vec<ChunkMove>,
    /// Blocks whose summaries to upload; a selection's candidate blocks.
    blocks: Vec<u32>,
    /// `[n_kv][sel_pages]` the pages of each head's selected slots, for a selection.
    resident: Vec<u32>,
    /// Each head's plan from the device's selection.
    plans: PagePlans,
    /// `[slot][n_kv]` valid tokens, for decode.
    slot_len: Vec<i32>,
    /// A dense layer's blocks in page order, for decode over its pages.
    index: Vec<u32>,
    /// One token's K then V rows of every KV head, for a dense layer's pages.
    row: Vec<T>,
}

impl<T: KvElem, O: DeviceOps<T>> OffloadBackend<T, O> {
    /// The backend for `geo` on the device `ops`, with the configuration's summary and pooling.
    pub fn new(geo: Geometry, config: &FreeKvConfig, ops: O) -> Self {
        Self {
            cpu: CpuBackend::new(geo, config),
            geo,
            pooling: config.pooling,
            ops,
            step_waits: AtomicU64::new(0),
            unpinned: AtomicU64::new(0),
            correction: config.mode.correction(),
        }
    }

    /// Bytes of one chunk (one head's K+V of one page).
    fn chunk_bytes(&self) -> usize {
        2 * self.geo.page_size * self.geo.head_dim * std::mem::size_of::<T>()
    }

    /// Uploads the summaries of `scratch.blocks` that the host tier holds (sorted, distinct).
    fn upload_summaries(
        &self,
        host: &mut HostTierOf<T, O>,
        scratch: &mut OffloadScratch<T, O::Scratch>,
    ) -> anyhow::Result<()> {
        let Some(mirror) = host.summaries.as_mut() else {
            return Ok(());
        };
        scratch.blocks.append(&mut host.unmirrored);
        scratch.blocks.sort_unstable();
        scratch.blocks.dedup();
        scratch.blocks.retain(|&b| host.tier.is_summarised(b));
        if scratch.blocks.is_empty() {
            return Ok(());
        }
        let copied =
            self.ops
                .upload_summaries(&host.tier, mirror, &scratch.blocks, &mut scratch.device);
        if copied.is_err() {
            // The mirror may hold any of these partly: all are copied again next time.
            host.unmirrored.extend_from_slice(&scratch.blocks);
        }
        copied.with_context(|| {
            format!(
                "copying {} page summaries to the device",
                scratch.blocks.len()
            )
        })
    }

    /// The loaded call's values on the host: a decode step's read from its staged copy the
    /// first time (the one wait for the device a step may make).
    fn host_values<'a>(
        &self,
        batch: &'a mut OffloadBatch<O::Batch, O::Staged>,
    ) -> anyhow::Result<&'a mut CpuBatch> {
        match batch.call {
            Call::Empty => anyhow::bail!("no call is loaded"),
            Call::Decode {
                host_loaded: false, ..
            } => {}
            _ => return Ok(&mut batch.host),
        }
        {
            self.note_wait(batch);
            let staged = batch.staged.as_ref().context("no decode step is loaded")?;
            let [q, k, v] = self
                .ops
                .read_staged(staged)
                .context("reading a decode step's q, k and v on the host")?;
            let inputs = Inputs::Decode {
                q: &q,
                k: &k,
                v: &v,
            };
            self.cpu.load(&mut batch.host, inputs)?;
            if let Call::Decode { host_loaded, .. } = &mut batch.call {
                *host_loaded = true;
            }
        }
        Ok(&mut batch.host)
    }

    /// Counts a wait of the loaded call for its own device work (once per call; none after
    /// its output was taken).
    fn note_wait(&self, batch: &mut OffloadBatch<O::Batch, O::Staged>) {
        if let Call::Decode {
            waited: waited @ false,
            retired: false,
            ..
        } = &mut batch.call
        {
            *waited = true;
            self.step_waits.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Whether decode runs on the device with these parameters (a softcap must be positive).
    fn decode_on_device(params: &AttnParams) -> bool {
        params.softcap.is_none_or(|c| c > 0.0)
    }
}

/// The device tier of an [`OffloadBackend`] on `O`.
type DeviceTierOf<T, O> =
    OffloadTier<T, <O as DeviceMemory<T>>::Slots, <O as DeviceMemory<T>>::Query>;

/// The host tier of an [`OffloadBackend`] on `O`.
type HostTierOf<T, O> = OffloadHostTier<
    T,
    <O as DeviceMemory<T>>::HostPin,
    <O as DeviceMemory<T>>::Summaries,
    <O as DeviceMemory<T>>::Slots,
>;

/// The new token of batch row `row` (its first token) for an append: read in place from a
/// decode step's device batch, or converted into `buf` (`2 [n_kv][d]`, K then V rows of every
/// KV head, as stored) from the host's values.
fn token_rows<'a, T: KvElem, B, S>(
    geo: &Geometry,
    batch: &'a OffloadBatch<B, S>,
    row: usize,
    buf: &'a mut Vec<T>,
) -> NewToken<'a, T, B> {
    if batch.on_device() {
        return NewToken::Batch {
            batch: &batch.dev,
            row,
        };
    }
    let (n_kv, d) = (geo.num_kv_heads, geo.head_dim);
    buf.resize(2 * n_kv * d, T::default());
    let (k, v) = buf.split_at_mut(n_kv * d);
    for h in 0..n_kv {
        let (kr, vr) = batch.host.kv_row(row, h, 0);
        T::from_f32s(kr, &mut k[h * d..(h + 1) * d]);
        T::from_f32s(vr, &mut v[h * d..(h + 1) * d]);
    }
    NewToken::Host { k, v }
}

/// The tokens of `page` a query attends in a context of `len` tokens whose first visible token
/// is `first` (a sliding window's start), packed by [`token_span`].
fn visible_span(g: &Geometry, first: usize, page: usize, len: usize) -> i32 {
    let hi = g.valid_tokens(page, len);
    token_span(first.saturating_sub(page * g.page_size).min(hi), hi)
}

impl<T: KvElem, O: DeviceOps<T>> Memory for OffloadBackend<T, O> {
    type HostTier = HostTierOf<T, O>;
    type DeviceTier = OffloadTier<T, O::Slots, O::Query>;
    type Scratch = OffloadScratch<T, O::Scratch>;
    type Batch = OffloadBatch<O::Batch, O::Staged>;

    fn geometry(&self) -> &Geometry {
        &self.geo
    }

    fn alloc_host_tier(&self, num_blocks: usize, scored: bool) -> anyhow::Result<Self::HostTier> {
        let tier = self.cpu.alloc_host_tier(num_blocks, scored)?;
        let (summaries, pages) = if scored {
            let mirror = self.ops.alloc_summaries(num_blocks);
            (
                Some(mirror.context("allocating the device's page summaries")?),
                None,
            )
        } else {
            let pages = match self.ops.alloc_slots(num_blocks) {
                Ok(pages) => Some(pages),
                Err(e) => {
                    // Served from the host tier instead, as before the device had a copy.
                    #[cfg(any(feature = "engine", feature = "cuda"))]
                    tracing::warn!(
                        "FreeKV: a dense layer's {num_blocks} pages ({} MiB) do not fit in device \
                         memory ({e:#}); it decodes from the host tier, on the host. Fewer dense \
                         layers (--freekv-dense-layers) or a smaller pool keep it on the device.",
                        self.ops.slots_bytes(num_blocks) >> 20
                    );
                    drop(e);
                    None
                }
            };
            (None, pages)
        };
        let stale = if pages.is_some() {
            vec![false; num_blocks]
        } else {
            Vec::new()
        };
        let pin = self.ops.pin_host(tier.pages());
        if pin.is_none() && !tier.pages().is_empty() {
            self.unpinned.fetch_add(1, Ordering::Relaxed);
        }
        Ok(OffloadHostTier {
            _pin: pin,
            tier,
            summaries,
            pages,
            stale,
            pending: Vec::new(),
            unmirrored: Vec::new(),
        })
    }

    fn alloc_device_tier(&self) -> anyhow::Result<Self::DeviceTier> {
        let width = self.geo.num_kv_heads * self.geo.head_dim;
        Ok(OffloadTier {
            plan: self.cpu.alloc_device_tier()?,
            slots: self
                .ops
                .alloc_slots(self.geo.slots)
                .context("allocating a working set")?,
            reference: self
                .ops
                .alloc_query()
                .context("allocating a stored query on the device")?,
            new_token: vec![T::default(); 2 * width],
            held: Vec::new(),
            held_len: 0,
        })
    }

    fn alloc_scratch(&self, role: Role) -> Self::Scratch {
        OffloadScratch {
            cpu: self.cpu.alloc_scratch(role),
            device: self.ops.alloc_scratch(role),
            moves: Vec::new(),
            blocks: Vec::new(),
            resident: Vec::new(),
            plans: PagePlans::default(),
            slot_len: Vec::new(),
            index: Vec::new(),
            row: Vec::new(),
        }
    }

    fn alloc_batch(&self) -> Self::Batch {
        OffloadBatch {
            call: Call::Empty,
            host: CpuBatch::default(),
            staged: None,
            dev: self.ops.alloc_batch(),
            host_rows: Vec::new(),
        }
    }

    fn host_tier_bytes(&self, num_blocks: usize) -> usize {
        self.cpu.host_tier_bytes(num_blocks)
    }

    fn device_tier_bytes(&self) -> usize {
        self.cpu.device_tier_bytes() + self.ops.slots_bytes(self.geo.slots) + self.ops.query_bytes()
    }

    /// On a GPU, the calls that waited for the device on the decode critical path: for the
    /// correction test's similarities, or to read their q/k/v on the host (a blocking
    /// selection, a row the host attends). Reads after the call (the worker's, or the next
    /// call's `settle`) wait for nothing: the step is long complete.
    fn device_waits(&self) -> u64 {
        self.step_waits.load(Ordering::Relaxed)
    }

    fn unpinned_host_tiers(&self) -> u64 {
        self.unpinned.load(Ordering::Relaxed)
    }

    fn device_pool_bytes(&self, num_blocks: usize, scored: bool) -> usize {
        if scored {
            self.ops.summaries_bytes(num_blocks)
        } else {
            self.ops.slots_bytes(num_blocks)
        }
    }

    fn holds_short_contexts(&self) -> bool {
        true
    }

    fn default_workers(&self) -> usize {
        self.ops.default_workers()
    }

    fn slot_plan(dev: &Self::DeviceTier) -> &SlotPlan {
        &dev.plan
    }
}

impl<T: KvElem, O: DeviceOps<T>> Backend for OffloadBackend<T, O> {
    fn load(&self, batch: &mut Self::Batch, inputs: Inputs<'_>) -> anyhow::Result<()> {
        match inputs {
            Inputs::Decode { q, k, v } => self.load_decode(batch, q, k, v),
            Inputs::Prefill { q, k, v, last_only } => self.load_prefill(batch, q, k, v, last_only),
        }
    }

    fn take_output(&self, batch: &mut Self::Batch, dtype: DType) -> anyhow::Result<Tensor> {
        if let Call::Decode { retired, .. } = &mut batch.call {
            *retired = true;
        }
        let attended = |p: &mut DevicePrompt| p.out.iter().any(Option::is_some);
        if batch.prompt().is_some_and(attended) {
            return self.take_prompt_output(batch, dtype);
        }
        if let Call::Prompt { device } = &mut batch.call {
            *device = None;
        }
        if batch.on_device() {
            let OffloadBatch {
                host,
                dev,
                host_rows,
                ..
            } = batch;
            let host_out = if host_rows.is_empty() {
                &[][..]
            } else {
                &host.out[..]
            };
            return self
                .ops
                .finish_batch(dev, host_rows, host_out, dtype)
                .context("collecting a decode step's output on the device");
        }
        Ok(self
            .cpu
            .take_output(&mut batch.host, dtype)?
            .to_device(self.ops.device())?)
    }

    fn write(
        &self,
        host: &mut Self::HostTier,
        batch: &mut Self::Batch,
        rows: &[WriteRow<'_>],
        scratch: &mut Self::Scratch,
    ) -> anyhow::Result<()> {
        for w in rows {
            self.write_row(host, batch, w, scratch)?;
            if w.summarised_pages > 0 {
                self.ensure_summaries(host, &w.table[..w.summarised_pages], scratch)?;
            }
        }
        Ok(())
    }

    fn settle(
        &self,
        host: &mut Self::HostTier,
        batch: &mut Self::Batch,
        scratch: &mut Self::Scratch,
    ) -> anyhow::Result<()> {
        scratch.blocks.clear();
        if host.pending.is_empty() {
            // Summaries whose copy failed earlier are copied again.
            return self.upload_summaries(host, scratch);
        }
        let values = self
            .host_values(batch)
            .context("writing the last decode step's tokens into the host tier")?;
        let p = self.geo.page_size;
        // Kept until every token is written: a failed call is retried whole by the next one
        // (the batch is not reloaded before a settle succeeds; a token written twice is the
        // same token).
        for t in &host.pending {
            // The device already holds the token; a page it fills is summarised here.
            let w = WriteRow {
                table: &[t.block],
                row: t.row,
                first_pos: t.pos,
                n: 1,
                summarised_pages: 0,
            };
            self.cpu
                .write_row(&mut host.tier, values, &w, &mut scratch.cpu);
            if t.pos + 1 == p {
                scratch.blocks.push(t.block);
            }
        }
        host.pending.clear();
        // Mirrored before any selection can score them (the next call, or the worker).
        self.upload_summaries(host, scratch)
    }

    fn arrange(
        &self,
        host: &Self::HostTier,
        rows: &mut [ArrangeRow<'_, Self::DeviceTier>],
        batch: &Self::Batch,
    ) -> anyhow::Result<Vec<RecallStats>> {
        rows.iter_mut()
            .map(|r| {
                let (table, len) = (r.table, r.len);
                match r.how {
                    Arrange::Reset => self.reset_working_set(host, table, r.dev, len),
                    Arrange::Advance { row } => {
                        self.advance_working_set(r.dev, len, batch, row)?;
                        Ok(RecallStats::default())
                    }
                    Arrange::Fresh { row } => {
                        let stats = self.reset_working_set(host, table, r.dev, len)?;
                        self.advance_working_set(r.dev, len, batch, row)?;
                        Ok(stats)
                    }
                    Arrange::HoldEvery { row } => {
                        self.hold_whole_context(host, table, r.dev, len, batch, row)
                    }
                }
            })
            .collect()
    }

    fn store_query(
        &self,
        rows: &mut [StoreQuery<'_, Self::DeviceTier>],
        batch: &mut Self::Batch,
    ) -> anyhow::Result<()> {
        if rows.is_empty() {
            // Reading the values on the host would wait for the device.
            return Ok(());
        }
        let values = self.host_values(batch)?;
        for r in rows {
            let plan = &mut r.dev.plan;
            let mut one = [StoreQuery {
                dev: plan,
                row: r.row,
                token: r.token,
            }];
            self.cpu.store_query(&mut one, values)?;
            if self.correction {
                self.ops
                    .upload_query(r.dev.plan.query(), &mut r.dev.reference)
                    .context("copying the stored query to the device")?;
            }
        }
        Ok(())
    }

    fn query_similarities(
        &self,
        rows: &[(usize, &Self::DeviceTier)],
        batch: &mut Self::Batch,
        out: &mut [f32],
    ) -> anyhow::Result<()> {
        if !batch.on_device() {
            let values = self.host_values(batch)?;
            let plans: Vec<_> = rows.iter().map(|&(r, dev)| (r, &dev.plan)).collect();
            return self.cpu.query_similarities(&plans, values, out);
        }
        if !rows.is_empty() {
            self.note_wait(batch);
        }
        let refs: Vec<_> = rows.iter().map(|&(r, dev)| (r, &dev.reference)).collect();
        self.ops
            .query_similarities(&mut batch.dev, &refs, out)
            .context("the correction test on the device")
    }

    fn select(
        &self,
        host: &Self::HostTier,
        rows: &mut [SelectRow<'_, Self::DeviceTier>],
        batch: &Self::Batch,
        scratch: &mut Self::Scratch,
    ) -> anyhow::Result<Vec<RecallStats>> {
        self.plan_selections(host, rows, batch, scratch)?;
        self.recall_rows(host, rows, scratch)
    }

    fn attend(
        &self,
        host: &mut Self::HostTier,
        batch: &mut Self::Batch,
        job: Attend<'_, Self::DeviceTier>,
        params: &AttnParams,
        scratch: &mut Self::Scratch,
    ) -> anyhow::Result<()> {
        match job {
            Attend::Decode(rows) => self.attend_decode_rows(host, batch, rows, params, scratch),
            Attend::Prefill(rows) => {
                for r in rows {
                    let on_device = batch.prompt().is_some()
                        && Self::decode_on_device(params)
                        && self.attend_prompt_on_device(host, r, batch, params, scratch)?;
                    if !on_device {
                        self.cpu.attend_prefill_row(
                            &host.tier,
                            &mut batch.host,
                            r,
                            params,
                            &mut scratch.cpu,
                        );
                    }
                }
                Ok(())
            }
        }
    }

    fn read(
        &self,
        host: &Self::HostTier,
        batch: &mut Self::Batch,
        what: Read<'_>,
        out: &mut Vec<f32>,
    ) -> anyhow::Result<()> {
        if let Read::Keys { .. } = what {
            anyhow::ensure!(
                host.pending.is_empty(),
                "keys read before the step's tokens reached the host tier"
            );
        } else {
            self.host_values(batch)?;
        }
        self.cpu.read(&host.tier, &mut batch.host, what, out)
    }
}

impl<T: KvElem, O: DeviceOps<T>> OffloadBackend<T, O> {
    /// Moves the window of `dev` forward over the token of batch row `row` (position
    /// `len - 1`).
    fn advance_working_set(
        &self,
        dev: &mut DeviceTierOf<T, O>,
        len: usize,
        batch: &OffloadBatch<O::Batch, O::Staged>,
        row: usize,
    ) -> anyhow::Result<()> {
        dev.held_len = 0;
        self.cpu.advance_window_plan(&mut dev.plan, len);
        let slot = self.geo.window_slot((len - 1) / self.geo.page_size);
        self.append_from_batch(dev, slot, len - 1, batch, row)
    }

    /// One row of [`Backend::write`].
    fn write_row(
        &self,
        host: &mut HostTierOf<T, O>,
        batch: &mut OffloadBatch<O::Batch, O::Staged>,
        w: &WriteRow<'_>,
        scratch: &mut OffloadScratch<T, O::Scratch>,
    ) -> anyhow::Result<()> {
        let (table, row, first_pos, n) = (w.table, w.row, w.first_pos, w.n);
        let p = self.geo.page_size;
        let block = table[first_pos / p];
        // A decode token waits for the step's staged values (a page it fills is summarised
        // then), unless a dense layer's stale page must be copied whole from the host tier now.
        let defer =
            batch.on_device() && n == 1 && !(host.pages.is_some() && host.stale[block as usize]);
        if defer {
            host.pending.push(PendingToken {
                row,
                block,
                pos: first_pos % p,
            });
        } else {
            let values = self.host_values(batch)?;
            self.cpu
                .write_row(&mut host.tier, values, w, &mut scratch.cpu);
        }
        self.mirror_tokens(host, batch, w, scratch)?;
        // The pages that became full were summarised: mirror them.
        scratch.blocks.clear();
        scratch
            .blocks
            .extend((first_pos / p..(first_pos + n) / p).map(|page| table[page]));
        self.upload_summaries(host, scratch)
    }

    /// Summarises the blocks of `full` where their summary is missing, and mirrors them.
    fn ensure_summaries(
        &self,
        host: &mut HostTierOf<T, O>,
        full: &[u32],
        scratch: &mut OffloadScratch<T, O::Scratch>,
    ) -> anyhow::Result<()> {
        scratch.blocks.clear();
        scratch.blocks.extend(
            full.iter()
                .copied()
                .filter(|&b| !host.tier.is_summarised(b)),
        );
        self.cpu
            .ensure_summaries(&mut host.tier, full, &mut scratch.cpu);
        self.upload_summaries(host, scratch)
    }

    /// [`Arrange::Reset`]: the sink and window pages copied into their slots.
    fn reset_working_set(
        &self,
        host: &HostTierOf<T, O>,
        table: &[u32],
        dev: &mut OffloadTier<T, O::Slots, O::Query>,
        len: usize,
    ) -> anyhow::Result<RecallStats> {
        let g = &self.geo;
        dev.held_len = 0;
        let mut stats = self.cpu.reset_plan(&mut dev.plan, len);
        let mut moves = Vec::new();
        for h in 0..g.num_kv_heads {
            for (slot, &page) in dev.plan.slots(h).iter().enumerate() {
                if page != NO_PAGE {
                    moves.push(ChunkMove {
                        block: table[page as usize],
                        head: h as u32,
                        slot: slot as u32,
                    });
                    // The page's valid tokens are what the working set gains.
                    stats.bytes += 2
                        * g.valid_tokens(page as usize, len)
                        * g.head_dim
                        * std::mem::size_of::<T>();
                }
            }
        }
        self.ops
            .move_chunks(&host.tier, &mut dev.slots, &moves, None)
            .context("installing the sink and window pages")?;
        Ok(stats)
    }
}

#[cfg(test)]
mod tests;
