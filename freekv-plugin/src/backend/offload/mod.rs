//! The offload design: the working set of every (sequence, layer) in a device's own memory,
//! token-major (NHD), the full KV in the host tier, head-major (HND), as the paper lays them
//! out. [`OffloadBackend`] implements [`Backend`] once for every such device; the device itself
//! is a [`DeviceOps`]: CUDA (`crate::cuda::ops`, feature `cuda`) or host memory ([`host`], which
//! is how CI runs this orchestration against the CPU backend without a GPU, and the CPU's
//! `--freekv-device-tier copy` layout).
//!
//! Division of labour:
//! - host tier, summaries, the correction's similarity and the slot tables: the CPU backend's
//!   code on the host;
//! - page scoring: on the device, from a mirror of the summaries that follows the host tier
//!   (each summary uploaded when its page fills or is re-summarised); the pooled scores come
//!   back (one small read on the calling thread's own stream, as the authors' worker reads its
//!   recall list), and the host takes the top-k and plans the replacement with the CPU
//!   backend's code, so every device makes the CPU backend's plans;
//! - working-set resets and recalls: the plan's chunks moved by the device
//!   ([`DeviceOps::move_chunks`]); the tables follow the data;
//! - each new token: appended to its window slot on the device;
//! - a dense layer's pages: mirrored in the device's memory too (one slot per block of the
//!   pool, written as the host tier is), so its decode attention runs on the device;
//! - a sequence within the budget on a retrieving layer: its working set holds every page
//!   ([`Backend::hold_every_page`]: each page copied once, each new token appended);
//! - decode attention over a working set or a dense layer's pages: on the device.
//!   Sliding-window layers and prefill attention read the host tier on the host.

pub mod host;
pub mod ops;
mod staged;

use std::ops::Range;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};

use crate::backend::cpu::elem::KvElem;
use crate::backend::cpu::host_tier::HostTier;
use crate::backend::cpu::io::CpuBatch;
use crate::backend::cpu::select::{plan_replacement, SelectScratch};
use crate::backend::cpu::{CpuBackend, CpuScratch};
use crate::backend::{Backend, RecallStats, Role};
use crate::geometry::{Geometry, NO_PAGE};
use crate::plan::SlotPlan;
use crate::{AttnParams, FreeKvConfig, Pooling};

pub use ops::{span_tokens, token_span, ChunkMove, DeviceOps};

/// [`Backend`] for a device whose working sets live in its own memory.
pub struct OffloadBackend<T: KvElem, O> {
    cpu: CpuBackend<T>,
    geo: Geometry,
    pooling: Pooling,
    ops: O,
}

/// The working set of one (sequence, layer): the plan on the host, the slot data on the
/// device.
pub struct OffloadTier<T, S> {
    /// Slot tables, pending replacements and the stored query.
    pub plan: SlotPlan,
    /// The slot data.
    pub slots: S,
    /// The new token's K then V rows of every KV head (`2 [n_kv][d]`), reused by each append.
    new_token: Vec<T>,
    /// While the working set holds every page of a short context: the blocks it holds (the
    /// sequence's table at `held_len` tokens). `held_len` 0: it holds a selection or nothing.
    held: Vec<u32>,
    held_len: usize,
}

/// One layer's host tier, registered with the device while it lives, and what the device
/// mirrors of it: the summaries of a sparse layer, or every page of a dense one.
pub struct OffloadHost<T, P, M, S> {
    /// Declared first: unregistered before the pages are freed.
    _pin: P,
    tier: HostTier<T>,
    /// None for a layer whose pages are never scored (dense).
    summaries: Option<M>,
    /// A dense layer's pages on the device: block `b` in slot `b`. None for a sparse layer
    /// (or a dense one whose pages did not fit: it decodes from the host tier).
    pages: Option<S>,
    /// Per block: its copy in `pages` may differ from the host tier (a copy failed), so
    /// decode over it reads the host tier until a whole-page copy succeeds.
    stale: Vec<bool>,
}

/// Per-thread working memory.
pub struct OffloadScratch<T: KvElem, S> {
    cpu: CpuScratch<T>,
    device: S,
    moves: Vec<ChunkMove>,
    /// Blocks whose summaries to upload; a selection's candidate blocks.
    blocks: Vec<u32>,
    /// `[n_kv][n_cand]` pooled scores from the device.
    scores: Vec<f32>,
    select: SelectScratch,
    /// `[slot][n_kv]` valid tokens, for decode.
    slot_len: Vec<i32>,
    /// A dense layer's blocks in page order, for decode over its pages.
    index: Vec<u32>,
    /// One token's K then V rows of every KV head, for a dense layer's pages.
    row: Vec<T>,
    /// One query and its output, `[n_q][d]` f32.
    q: Vec<f32>,
    out: Vec<f32>,
}

impl<T: KvElem, O: DeviceOps<T>> OffloadBackend<T, O> {
    /// The backend for `geo` on the device `ops`, with the configuration's summary and pooling.
    pub fn new(geo: Geometry, config: &FreeKvConfig, ops: O) -> Self {
        Self {
            cpu: CpuBackend::new(geo, config),
            geo,
            pooling: config.pooling,
            ops,
        }
    }

    /// The device.
    pub fn ops(&self) -> &O {
        &self.ops
    }

    /// Bytes of one chunk (one head's K+V of one page).
    fn chunk_bytes(&self) -> usize {
        2 * self.geo.page_size * self.geo.head_dim * std::mem::size_of::<T>()
    }

    /// Uploads the summaries of `scratch.blocks` that the host tier holds (sorted, distinct).
    fn upload_summaries(
        &self,
        host: &mut HostOf<T, O>,
        scratch: &mut OffloadScratch<T, O::Scratch>,
    ) -> anyhow::Result<()> {
        let Some(mirror) = host.summaries.as_mut() else {
            return Ok(());
        };
        scratch.blocks.sort_unstable();
        scratch.blocks.dedup();
        scratch.blocks.retain(|&b| host.tier.is_summarised(b));
        if scratch.blocks.is_empty() {
            return Ok(());
        }
        self.ops
            .upload_summaries(&host.tier, mirror, &scratch.blocks, &mut scratch.device)
            .with_context(|| {
                format!(
                    "copying {} page summaries to the device",
                    scratch.blocks.len()
                )
            })
    }

    /// Mirrors the tokens `first_pos..first_pos + n` of a dense layer (just written to the
    /// host tier) into its pages on the device: one token from the batch's row, more as the
    /// pages that hold them.
    #[allow(clippy::too_many_arguments)]
    fn mirror_tokens(
        &self,
        host: &mut HostOf<T, O>,
        table: &[u32],
        batch: &CpuBatch,
        row: usize,
        first_pos: usize,
        n: usize,
        scratch: &mut OffloadScratch<T, O::Scratch>,
    ) -> anyhow::Result<()> {
        let Some(pages) = host.pages.as_mut() else {
            return Ok(());
        };
        let g = &self.geo;
        let p = g.page_size;
        let touched = &table[first_pos / p..(first_pos + n).div_ceil(p)];
        // Until it is known to have landed, the device's copy of these pages may be stale.
        let was_stale = touched.iter().any(|&b| host.stale[b as usize]);
        for &b in touched {
            host.stale[b as usize] = true;
        }
        if n == 1 && !was_stale {
            let width = g.num_kv_heads * g.head_dim;
            scratch.row.resize(2 * width, T::default());
            let (k, v) = scratch.row.split_at_mut(width);
            for h in 0..g.num_kv_heads {
                let (kr, vr) = batch.kv_row(row, h, 0);
                let r = h * g.head_dim..(h + 1) * g.head_dim;
                T::from_f32s(kr, &mut k[r.clone()]);
                T::from_f32s(vr, &mut v[r]);
            }
            let block = table[first_pos / p] as usize;
            self.ops
                .append_token(pages, block, first_pos % p, k, v)
                .context("appending the new token to a dense layer's pages on the device")?;
            host.stale[block] = false;
            return Ok(());
        }
        scratch.moves.clear();
        for &block in touched {
            scratch
                .moves
                .extend((0..g.num_kv_heads as u32).map(|head| ChunkMove {
                    block,
                    head,
                    slot: block,
                }));
        }
        self.ops
            .move_chunks(&host.tier, pages, &scratch.moves, Some(&mut scratch.device))
            .with_context(|| {
                format!(
                    "copying {} pages of a dense layer to the device",
                    touched.len()
                )
            })?;
        for &b in touched {
            host.stale[b as usize] = false;
        }
        Ok(())
    }

    /// Appends token `pos` (from batch row `row`) to `slot` of a working set.
    fn append_from_batch(
        &self,
        dev: &mut OffloadTier<T, O::Slots>,
        slot: usize,
        pos: usize,
        batch: &CpuBatch,
        row: usize,
    ) -> anyhow::Result<()> {
        let g = &self.geo;
        let width = g.num_kv_heads * g.head_dim;
        let (k, v) = dev.new_token.split_at_mut(width);
        for h in 0..g.num_kv_heads {
            let (kr, vr) = batch.kv_row(row, h, 0);
            let r = h * g.head_dim..(h + 1) * g.head_dim;
            T::from_f32s(kr, &mut k[r.clone()]);
            T::from_f32s(vr, &mut v[r]);
        }
        self.ops
            .append_token(&mut dev.slots, slot, pos % g.page_size, k, v)
            .context("appending the new token to its window slot")
    }

    /// Whether decode runs on the device with these parameters (a softcap must be positive).
    fn decode_on_device(params: &AttnParams) -> bool {
        params.softcap.is_none_or(|c| c > 0.0)
    }
}

/// The host tier of an [`OffloadBackend`] on `O`.
type HostOf<T, O> = OffloadHost<
    T,
    <O as DeviceOps<T>>::HostPin,
    <O as DeviceOps<T>>::Summaries,
    <O as DeviceOps<T>>::Slots,
>;

/// Reads a tensor's values on the host (a no-op for CPU tensors).
fn on_host(t: &Tensor) -> anyhow::Result<Tensor> {
    Ok(t.to_device(&Device::Cpu)?)
}

impl<T: KvElem, O: DeviceOps<T>> Backend for OffloadBackend<T, O> {
    type HostTier = HostOf<T, O>;
    type DeviceTier = OffloadTier<T, O::Slots>;
    type Scratch = OffloadScratch<T, O::Scratch>;
    type Batch = CpuBatch;

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
        Ok(OffloadHost {
            _pin: self.ops.pin_host(tier.pages()),
            tier,
            summaries,
            pages,
            stale,
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
            scores: Vec::new(),
            select: SelectScratch::default(),
            slot_len: Vec::new(),
            index: Vec::new(),
            row: Vec::new(),
            q: Vec::new(),
            out: Vec::new(),
        }
    }

    fn alloc_batch(&self) -> CpuBatch {
        CpuBatch::default()
    }

    fn host_tier_bytes(&self, num_blocks: usize) -> usize {
        self.cpu.host_tier_bytes(num_blocks)
    }

    fn device_tier_bytes(&self) -> usize {
        self.cpu.device_tier_bytes() + self.ops.slots_bytes(self.geo.slots)
    }

    fn device_pool_bytes(&self, num_blocks: usize, scored: bool) -> usize {
        if scored {
            self.ops.summaries_bytes(num_blocks)
        } else {
            self.ops.slots_bytes(num_blocks)
        }
    }

    fn load_decode(
        &self,
        batch: &mut CpuBatch,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> anyhow::Result<()> {
        self.cpu
            .load_decode(batch, &on_host(q)?, &on_host(k)?, &on_host(v)?)
    }

    fn load_prefill(
        &self,
        batch: &mut CpuBatch,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        last_only: Option<&[usize]>,
    ) -> anyhow::Result<()> {
        let (q, k, v) = (on_host(q)?, on_host(k)?, on_host(v)?);
        self.cpu.load_prefill(batch, &q, &k, &v, last_only)
    }

    fn take_output(&self, batch: &mut CpuBatch, dtype: DType) -> anyhow::Result<Tensor> {
        Ok(self
            .cpu
            .take_output(batch, dtype)?
            .to_device(self.ops.device())?)
    }

    fn write_tokens(
        &self,
        host: &mut Self::HostTier,
        table: &[u32],
        batch: &CpuBatch,
        row: usize,
        first_pos: usize,
        n: usize,
        scratch: &mut Self::Scratch,
    ) -> anyhow::Result<()> {
        self.cpu.write_tokens(
            &mut host.tier,
            table,
            batch,
            row,
            first_pos,
            n,
            &mut scratch.cpu,
        )?;
        self.mirror_tokens(host, table, batch, row, first_pos, n, scratch)?;
        // The pages that became full were summarised: mirror them.
        let p = self.geo.page_size;
        scratch.blocks.clear();
        scratch
            .blocks
            .extend((first_pos / p..(first_pos + n) / p).map(|page| table[page]));
        self.upload_summaries(host, scratch)
    }

    fn ensure_summaries(
        &self,
        host: &mut Self::HostTier,
        table: &[u32],
        full_pages: usize,
        scratch: &mut Self::Scratch,
    ) -> anyhow::Result<usize> {
        scratch.blocks.clear();
        scratch.blocks.extend(
            table[..full_pages]
                .iter()
                .copied()
                .filter(|&b| !host.tier.is_summarised(b)),
        );
        let n = self
            .cpu
            .ensure_summaries(&mut host.tier, table, full_pages, &mut scratch.cpu)?;
        self.upload_summaries(host, scratch)?;
        Ok(n)
    }

    fn reset_working_set(
        &self,
        host: &Self::HostTier,
        table: &[u32],
        dev: &mut Self::DeviceTier,
        len: usize,
    ) -> anyhow::Result<RecallStats> {
        let g = &self.geo;
        dev.held_len = 0;
        let mut stats = self
            .cpu
            .reset_working_set(&host.tier, table, &mut dev.plan, len)?;
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

    fn advance_window(
        &self,
        table: &[u32],
        dev: &mut Self::DeviceTier,
        len: usize,
        batch: &CpuBatch,
        row: usize,
    ) -> anyhow::Result<()> {
        dev.held_len = 0;
        self.cpu
            .advance_window(table, &mut dev.plan, len, batch, row)?;
        let slot = self.geo.window_slot((len - 1) / self.geo.page_size);
        self.append_from_batch(dev, slot, len - 1, batch, row)
    }

    fn holds_short_contexts(&self) -> bool {
        true
    }

    fn hold_every_page(
        &self,
        host: &Self::HostTier,
        table: &[u32],
        dev: &mut Self::DeviceTier,
        len: usize,
        batch: &CpuBatch,
        row: usize,
    ) -> anyhow::Result<RecallStats> {
        let g = &self.geo;
        let pages = g.pages(len);
        anyhow::ensure!(
            !g.is_sparse(len) && table.len() >= pages,
            "a working set cannot hold all {pages} pages of a {len}-token context ({} slots, \
             a table of {} blocks)",
            g.slots,
            table.len()
        );
        // One more token of the context the slots hold: only what changed moves.
        let grown =
            dev.held_len > 0 && dev.held_len + 1 == len && table[..dev.held.len()] == dev.held[..];
        if !grown {
            dev.plan.clear();
        }
        let window = g.window_start(len).max(g.sink_pages);
        let selectable = g.selected_slots().start;
        let mut moves = Vec::new();
        let mut last_moved = false;
        for (page, &block) in table[..pages].iter().enumerate() {
            let slot = if page < g.sink_pages {
                page
            } else if page >= window {
                g.window_slot(page)
            } else {
                selectable + page - g.sink_pages
            };
            for h in 0..g.num_kv_heads {
                let held = &mut dev.plan.slots_mut(h)[slot];
                if *held != page as u32 {
                    *held = page as u32;
                    moves.push(ChunkMove {
                        block,
                        head: h as u32,
                        slot: slot as u32,
                    });
                    last_moved |= page + 1 == pages;
                }
            }
        }
        self.ops
            .move_chunks(&host.tier, &mut dev.slots, &moves, None)
            .context("copying a short context's pages into its working set")?;
        if !last_moved {
            // The last page stayed where it was: its new token goes in as an append.
            let slot = dev.plan.slots(0)[..]
                .iter()
                .position(|&p| p as usize + 1 == pages)
                .context("the last page is in no slot")?;
            self.append_from_batch(dev, slot, len - 1, batch, row)?;
        }
        dev.held.clear();
        dev.held.extend_from_slice(&table[..pages]);
        dev.held_len = len;
        Ok(RecallStats {
            pages: moves.len(),
            bytes: moves.len() * self.chunk_bytes(),
        })
    }

    fn store_query(
        &self,
        dev: &mut Self::DeviceTier,
        batch: &CpuBatch,
        row: usize,
        token: usize,
    ) -> anyhow::Result<()> {
        self.cpu.store_query(&mut dev.plan, batch, row, token)
    }

    fn query_similarity(
        &self,
        dev: &Self::DeviceTier,
        batch: &CpuBatch,
        row: usize,
        out: &mut [f32],
    ) -> anyhow::Result<()> {
        self.cpu.query_similarity(&dev.plan, batch, row, out)
    }

    fn select(
        &self,
        host: &Self::HostTier,
        table: &[u32],
        dev: &mut Self::DeviceTier,
        candidates: Range<usize>,
        heads: &[bool],
        scratch: &mut Self::Scratch,
    ) -> anyhow::Result<()> {
        let g = &self.geo;
        let n = candidates.len();
        let Some(mirror) = host.summaries.as_ref() else {
            anyhow::bail!(
                "page selection on a layer allocated as dense (no page summaries on the device)"
            );
        };
        scratch.blocks.clear();
        scratch.blocks.extend_from_slice(&table[candidates.clone()]);
        scratch.scores.clear();
        scratch.scores.resize(g.num_kv_heads * n, 0.0);
        self.ops
            .score_pages(
                mirror,
                &scratch.blocks,
                dev.plan.query(),
                heads,
                self.pooling,
                &mut scratch.scores,
                &mut scratch.device,
            )
            .context("scoring the candidate pages")?;
        let sel = g.selected_slots();
        for h in (0..g.num_kv_heads).filter(|&h| heads[h]) {
            let sc = &mut scratch.select;
            sc.pooled.clear();
            sc.pooled
                .extend_from_slice(&scratch.scores[h * n..(h + 1) * n]);
            plan_replacement(g, candidates.clone(), &dev.plan.slots(h)[sel.clone()], sc);
            dev.plan.set_plan(h, sc.plan.iter().copied());
        }
        Ok(())
    }

    fn recall(
        &self,
        host: &Self::HostTier,
        table: &[u32],
        dev: &mut Self::DeviceTier,
        heads: &[bool],
        scratch: &mut Self::Scratch,
    ) -> anyhow::Result<RecallStats> {
        let g = &self.geo;
        dev.held_len = 0;
        scratch.moves.clear();
        for h in (0..g.num_kv_heads).filter(|&h| heads[h]) {
            for e in dev.plan.plan(h) {
                if e.page != NO_PAGE {
                    scratch.moves.push(ChunkMove {
                        block: table[e.page as usize],
                        head: h as u32,
                        slot: e.slot,
                    });
                }
            }
        }
        self.ops
            .move_chunks(
                &host.tier,
                &mut dev.slots,
                &scratch.moves,
                Some(&mut scratch.device),
            )
            .context("recalling the selected pages")?;
        // The tables follow the data (and the plans are consumed).
        let mut stats =
            self.cpu
                .recall(&host.tier, table, &mut dev.plan, heads, &mut scratch.cpu)?;
        debug_assert_eq!(stats.pages, scratch.moves.len());
        stats.bytes = stats.pages * self.chunk_bytes();
        Ok(stats)
    }

    fn resident_pages(
        &self,
        dev: &Self::DeviceTier,
        head: usize,
        len: usize,
    ) -> anyhow::Result<Vec<u32>> {
        self.cpu.resident_pages(&dev.plan, head, len)
    }

    fn attend_decode(
        &self,
        host: &Self::HostTier,
        table: &[u32],
        len: usize,
        dev: Option<&Self::DeviceTier>,
        batch: &mut CpuBatch,
        row: usize,
        params: &AttnParams,
        scratch: &mut Self::Scratch,
    ) -> anyhow::Result<()> {
        let pages_on_device = || {
            host.pages.is_some()
                && !table[..self.geo.pages(len)]
                    .iter()
                    .any(|&b| host.stale[b as usize])
        };
        let on_device = Self::decode_on_device(params) && (dev.is_some() || pages_on_device());
        if !on_device {
            // The host tier (dense), or the host chunks the tables name.
            return self.cpu.attend_decode(
                &host.tier,
                table,
                len,
                dev.map(|d| &d.plan),
                batch,
                row,
                params,
                &mut scratch.cpu,
            );
        }
        let g = &self.geo;
        let (n_q, n_kv, d) = (g.num_q_heads(), g.num_kv_heads, g.head_dim);
        // The attended tokens of each slot (from the slot tables, or every page of the
        // context), cut at the sliding window's start.
        let first = params.first_visible(len - 1);
        let span = |page: usize| {
            let hi = g.valid_tokens(page, len);
            token_span(first.saturating_sub(page * g.page_size).min(hi), hi)
        };
        scratch.slot_len.clear();
        scratch.index.clear();
        let (slots, index) = match dev {
            Some(dev) => {
                scratch.slot_len.resize(g.slots * n_kv, 0);
                for h in 0..n_kv {
                    for (slot, &page) in dev.plan.slots(h).iter().enumerate() {
                        if page != NO_PAGE {
                            scratch.slot_len[slot * n_kv + h] = span(page as usize);
                        }
                    }
                }
                (&dev.slots, None)
            }
            None => {
                let pages = host.pages.as_ref().expect("checked above");
                let visible = first / g.page_size..g.pages(len);
                scratch.index.extend_from_slice(&table[visible.clone()]);
                for page in visible {
                    scratch
                        .slot_len
                        .extend(std::iter::repeat_n(span(page), n_kv));
                }
                (pages, Some(&scratch.index[..]))
            }
        };
        scratch.q.clear();
        scratch.q.extend_from_slice(batch.q_heads(row, 0..n_q));
        scratch.out.clear();
        scratch.out.resize(n_q * d, 0.0);
        self.ops
            .decode(
                slots,
                index,
                &scratch.slot_len,
                &scratch.q,
                params,
                &mut scratch.out,
                &mut scratch.device,
            )
            .with_context(|| {
                if index.is_some() {
                    "decode attention over a dense layer's pages"
                } else {
                    "decode attention over the working set"
                }
            })?;
        for h in 0..n_q {
            batch
                .out_row(row, h, 0)
                .copy_from_slice(&scratch.out[h * d..(h + 1) * d]);
        }
        Ok(())
    }

    fn attend_prefill(
        &self,
        host: &Self::HostTier,
        table: &[u32],
        cached_len: usize,
        new_len: usize,
        batch: &mut CpuBatch,
        row: usize,
        params: &AttnParams,
        scratch: &mut Self::Scratch,
    ) -> anyhow::Result<()> {
        self.cpu.attend_prefill(
            &host.tier,
            table,
            cached_len,
            new_len,
            batch,
            row,
            params,
            &mut scratch.cpu,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::host::HostOps;
    use super::*;
    use crate::backend::cpu::select::pooled_scores;
    use crate::plan::tests::geo;

    /// Summaries the host computes outside a page fill (`ensure_summaries`) reach the device's
    /// mirror, and a dense layer has none.
    #[test]
    fn summaries_computed_late_reach_the_mirror() {
        let g = geo();
        let off = OffloadBackend::new(g, &FreeKvConfig::default(), HostOps::<f32>::new(g));
        assert!(off.alloc_host_tier(4, false).unwrap().summaries.is_none());
        let mut host = off.alloc_host_tier(4, true).unwrap();
        let mut scratch = off.alloc_scratch(Role::Worker);
        // Block 2 filled behind the backend's back (no summary yet).
        for h in 0..g.num_kv_heads {
            for t in 0..g.page_size {
                let k: Vec<f32> = (0..g.head_dim)
                    .map(|c| ((h * 31 + t * 7 + c * 3) % 11) as f32 - 5.0)
                    .collect();
                host.tier.write_row(2, h, t, &k, &k);
            }
        }
        let (n_kv, d) = (g.num_kv_heads, g.head_dim);
        let q: Vec<f32> = (0..g.num_q_heads() * d)
            .map(|i| (i % 5) as f32 - 2.0)
            .collect();
        let score = |host: &HostOf<f32, HostOps<f32>>, scratch: &mut OffloadScratch<f32, _>| {
            let mut out = vec![0.0; n_kv];
            off.ops
                .score_pages(
                    host.summaries.as_ref().unwrap(),
                    &[2],
                    &q,
                    &[true; 3],
                    Pooling::Max,
                    &mut out,
                    &mut scratch.device,
                )
                .unwrap();
            out
        };
        assert_eq!(
            score(&host, &mut scratch),
            vec![0.0; n_kv],
            "nothing uploaded yet"
        );
        assert_eq!(
            off.ensure_summaries(&mut host, &[2], 1, &mut scratch)
                .unwrap(),
            1
        );
        let got = score(&host, &mut scratch);
        for h in 0..n_kv {
            let mut sc = SelectScratch::default();
            let group_q = &q[h * g.group * d..(h + 1) * g.group * d];
            let offsets = [host.tier.summary_offset(2, h)];
            pooled_scores(
                group_q,
                d,
                host.tier.summaries(),
                &offsets,
                Pooling::Max,
                &mut sc,
            );
            assert_eq!(got[h], sc.pooled[0], "head {h}");
            assert_ne!(got[h], 0.0, "head {h}");
        }
    }

    /// A dense layer attends from its own pages on the device, written by a prefill (whole
    /// pages) and a decode step (one token), not from the host tier.
    #[test]
    fn dense_layers_attend_from_their_pages_on_the_device() {
        let g = geo();
        let off = OffloadBackend::new(g, &FreeKvConfig::default(), HostOps::<f32>::new(g));
        let mut host = off.alloc_host_tier(6, false).unwrap();
        assert!(host.pages.is_some() && host.summaries.is_none());
        assert_eq!(
            off.device_pool_bytes(6, false),
            6 * 2 * g.page_size * g.num_kv_heads * g.head_dim * 4
        );
        let mut scratch = off.alloc_scratch(Role::Caller);
        let table = [4u32, 1, 5, 0];
        let (n_q, n_kv, d) = (g.num_q_heads(), g.num_kv_heads, g.head_dim);
        let val = |i: usize| ((i * 37 % 23) as f32 - 11.0) / 7.0;
        let cpu = Device::Cpu;
        let tensor = |n: usize, shift: usize, shape: &[usize]| {
            Tensor::from_vec((0..n).map(|i| val(i + shift)).collect(), shape, &cpu).unwrap()
        };
        // A 20-token prompt (pages 0-2, the last one partial), then one decode token.
        let kv = tensor(n_kv * 20 * d, 0, &[1, n_kv, 20, d]);
        let q = tensor(n_q * 20 * d, 1, &[1, n_q, 20, d]);
        let mut batch = off.alloc_batch();
        off.load_prefill(&mut batch, &q, &kv, &kv, None).unwrap();
        off.write_tokens(&mut host, &table, &batch, 0, 0, 20, &mut scratch)
            .unwrap();
        let (qd, kd) = (
            tensor(n_q * d, 5, &[1, n_q, d]),
            tensor(n_kv * d, 3, &[1, n_kv, d]),
        );
        let params = AttnParams::scaled(0.5);
        let attend = |host: &HostOf<f32, HostOps<f32>>,
                      scratch: &mut OffloadScratch<f32, _>,
                      on_device: bool| {
            let mut b = off.alloc_batch();
            off.load_decode(&mut b, &qd, &kd, &kd).unwrap();
            if on_device {
                off.attend_decode(host, &table, 21, None, &mut b, 0, &params, scratch)
                    .unwrap();
            } else {
                let sc = &mut scratch.cpu;
                off.cpu
                    .attend_decode(&host.tier, &table, 21, None, &mut b, 0, &params, sc)
                    .unwrap();
            }
            (0..n_q)
                .flat_map(|h| b.out_row(0, h, 0).to_vec())
                .collect::<Vec<f32>>()
        };
        off.load_decode(&mut batch, &qd, &kd, &kd).unwrap();
        off.write_tokens(&mut host, &table, &batch, 0, 20, 1, &mut scratch)
            .unwrap();
        let got = attend(&host, &mut scratch, true);
        let want = attend(&host, &mut scratch, false);
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!((a - b).abs() < 1e-5, "output {i}: {a} vs {b}");
        }
        // The device reads its own copy: a change behind the backend's back (never done by
        // the product; KV is immutable) shows in the host's attention only.
        let big = vec![40.0; d];
        for t in 0..g.page_size {
            host.tier.write_row(table[1], 0, t, &big, &big);
        }
        assert_eq!(attend(&host, &mut scratch, true), got);
        let changed = attend(&host, &mut scratch, false);
        assert_ne!(changed, want);
        // A page whose copy may be stale (a copy to the device failed) is read from the host
        // tier, until a write copies it whole again.
        host.stale[table[1] as usize] = true;
        assert_eq!(attend(&host, &mut scratch, true), changed);
        off.load_prefill(&mut batch, &q, &kv, &kv, None).unwrap();
        off.write_tokens(&mut host, &table, &batch, 0, 8, 1, &mut scratch)
            .unwrap();
        assert!(!host.stale[table[1] as usize]);
        assert_eq!(
            attend(&host, &mut scratch, true),
            attend(&host, &mut scratch, false)
        );
    }
}
