//! The CPU implementation of the FreeKV operations.
//!
//! The working set is read in place: its [`SlotPlan`] names, per KV head, the host-tier chunks
//! attention reads (on CPU both tiers share one memory, so copying pages only adds work). The
//! copy layout, a working set in memory of its own, is the offload design
//! ([`crate::backend::offload`]) on host memory.
//!
//! - [`host_tier`]: HND pages and summaries by block id;
//! - [`select`]: scores, pooling, top-k, replacement plan;
//! - [`attend`]: online-softmax attention over page segments;
//! - [`causal`]: a prompt chunk's tiled causal attention over the host tier;
//! - [`io`]: candle tensors in and out; [`math`], [`elem`], [`alloc`]: the small pieces.

pub mod alloc;
pub mod attend;
pub mod causal;
pub mod elem;
pub mod host_tier;
pub mod io;

pub mod select;

use std::marker::PhantomData;

use candle_core::{DType, Tensor};

use crate::correction::group_similarity;
use crate::geometry::{Geometry, NO_PAGE};
use crate::plan::SlotPlan;
use crate::probe::page_masses;
use crate::{AttnParams, FreeKvConfig, Pooling, Selector, SummaryKind};

use self::attend::{Attention, AttnScratch, Segment};
use self::causal::PrefillJob;
use self::elem::KvElem;
use self::host_tier::HostTier;
use self::io::CpuBatch;
use self::select::SelectScratch;
use super::{
    Arrange, ArrangeRow, Attend, AttendRow, Backend, CausalRow, Inputs, Memory, Read, RecallStats,
    Role, SelectRow, Selection, StoreQuery, WriteRow,
};

/// Attended tokens x KV heads from which a decode step runs its heads in parallel.
pub(crate) const PARALLEL_DECODE: usize = 8192;

/// The CPU backend for KV stored as `T`.
pub struct CpuBackend<T> {
    geo: Geometry,
    summary: SummaryKind,
    pooling: Pooling,
    _elem: PhantomData<fn() -> T>,
}

/// Working memory of the oracle selector: one head's keys (f32), its pages' masses, logits.
#[derive(Default)]
pub(crate) struct OracleScratch {
    /// One KV head's keys, `[len][d]`.
    pub keys: Vec<f32>,
    /// Per query head, each page's attention mass.
    pub masses: Vec<f32>,
    /// One query head's logits over the context.
    pub logits: Vec<f32>,
}

impl OracleScratch {
    /// The oracle's scores of `selection`'s candidate pages, from the keys in `self.keys`
    /// (`[selection.len][d]`): each page's exact attention mass for the group's query `q`
    /// (`[G][d]`), the mean over the group (see [`page_masses`]).
    fn scores(&mut self, geo: &Geometry, q: &[f32], selection: &Selection, out: &mut Vec<f32>) {
        let g = q.len() / geo.head_dim;
        let len = selection.len;
        let pages = geo.pages(len);
        let (masses, logits) = (&mut self.masses, &mut self.logits);
        page_masses(geo, &selection.params, q, &self.keys, len, masses, logits);
        out.clear();
        out.extend(
            selection
                .candidates
                .clone()
                .map(|j| (0..g).map(|h| masses[h * pages + j]).sum::<f32>() / g as f32),
        );
    }
}

/// Per-thread working memory.
pub struct CpuScratch<T: KvElem> {
    attn: AttnScratch,
    /// One computed tile of prefill attention.
    tile: Vec<f32>,
    select: SelectScratch,
    rows: Vec<f32>,
    /// Summary offsets of the candidates of one selection.
    offsets: Vec<usize>,
    /// The oracle selector's keys and masses.
    pub(crate) oracle: OracleScratch,
    /// A selection's queries at the softmax's scale.
    scaled_q: Vec<f32>,
    _elem: PhantomData<fn() -> T>,
}

impl<T: KvElem> CpuBackend<T> {
    /// A backend for `geo` with the configuration's summary and pooling.
    pub fn new(geo: Geometry, config: &FreeKvConfig) -> Self {
        Self {
            geo,
            summary: config.summary,
            pooling: config.pooling,
            _elem: PhantomData,
        }
    }

    /// The first `n` tokens of `head`'s chunk of `block`, at positions from `pos0`.
    fn segment<'a>(
        &self,
        host: &'a HostTier<T>,
        block: u32,
        head: usize,
        n: usize,
        pos0: usize,
    ) -> Segment<'a, T> {
        let (p, d) = (self.geo.page_size, self.geo.head_dim);
        let chunk = host.chunk(block, head);
        Segment {
            k: &chunk[..p * d],
            v: &chunk[p * d..],
            stride: d,
            n,
            pos0,
        }
    }
}

impl<T: KvElem> Memory for CpuBackend<T> {
    type HostTier = HostTier<T>;
    type DeviceTier = SlotPlan;
    type Scratch = CpuScratch<T>;
    type Batch = CpuBatch;

    fn geometry(&self) -> &Geometry {
        &self.geo
    }

    fn alloc_host_tier(&self, num_blocks: usize, _scored: bool) -> anyhow::Result<HostTier<T>> {
        HostTier::try_new(self.geo, num_blocks).ok_or_else(|| {
            anyhow::anyhow!(
                "could not allocate {} bytes",
                HostTier::<T>::bytes(&self.geo, num_blocks)
            )
        })
    }

    fn alloc_device_tier(&self) -> anyhow::Result<SlotPlan> {
        Ok(SlotPlan::new(self.geo))
    }

    fn alloc_scratch(&self, _role: Role) -> CpuScratch<T> {
        CpuScratch {
            attn: AttnScratch::default(),
            tile: Vec::new(),
            select: SelectScratch::default(),
            rows: Vec::new(),
            offsets: Vec::new(),
            oracle: OracleScratch::default(),
            scaled_q: Vec::new(),
            _elem: PhantomData,
        }
    }

    fn alloc_batch(&self) -> CpuBatch {
        CpuBatch::default()
    }

    fn host_tier_bytes(&self, num_blocks: usize) -> usize {
        HostTier::<T>::bytes(&self.geo, num_blocks)
    }

    fn device_tier_bytes(&self) -> usize {
        SlotPlan::bytes(&self.geo)
    }

    fn device_pool_bytes(&self, _num_blocks: usize, _scored: bool) -> usize {
        0
    }

    fn slot_plan(dev: &SlotPlan) -> &SlotPlan {
        dev
    }
}

impl<T: KvElem> Backend for CpuBackend<T> {
    fn load(&self, batch: &mut CpuBatch, inputs: Inputs<'_>) -> anyhow::Result<()> {
        match inputs {
            Inputs::Decode { q, k, v } => batch.load_decode(q, k, v)?,
            Inputs::Prefill { q, k, v, last_only } => batch.load_prefill(q, k, v, last_only)?,
        }
        self.check_heads(batch)
    }

    fn take_output(&self, batch: &mut CpuBatch, dtype: DType) -> anyhow::Result<Tensor> {
        batch.take_output(dtype)
    }

    fn write(
        &self,
        host: &mut HostTier<T>,
        batch: &mut CpuBatch,
        rows: &[WriteRow<'_>],
        scratch: &mut CpuScratch<T>,
    ) -> anyhow::Result<()> {
        for w in rows {
            self.write_row(host, batch, w, scratch);
            self.ensure_summaries(host, &w.table[..w.summarised_pages], scratch);
        }
        Ok(())
    }

    fn arrange(
        &self,
        _host: &HostTier<T>,
        rows: &mut [ArrangeRow<'_, SlotPlan>],
        _batch: &CpuBatch,
    ) -> anyhow::Result<Vec<RecallStats>> {
        rows.iter_mut()
            .map(|r| match r.how {
                Arrange::Reset => Ok(self.reset_plan(r.dev, r.len)),
                Arrange::Advance { .. } => {
                    self.advance_window_plan(r.dev, r.len);
                    Ok(RecallStats::default())
                }
                Arrange::Fresh { .. } => {
                    let stats = self.reset_plan(r.dev, r.len);
                    self.advance_window_plan(r.dev, r.len);
                    Ok(stats)
                }
                Arrange::HoldEvery { .. } => {
                    anyhow::bail!("this backend attends short contexts over the host tier")
                }
            })
            .collect()
    }

    fn store_query(
        &self,
        rows: &mut [StoreQuery<'_, SlotPlan>],
        batch: &mut CpuBatch,
    ) -> anyhow::Result<()> {
        let d = self.geo.head_dim;
        for r in rows {
            let q = r.dev.query_mut();
            for h in 0..self.geo.num_q_heads() {
                q[h * d..(h + 1) * d].copy_from_slice(batch.q_row(r.row, h, r.token));
            }
        }
        Ok(())
    }

    fn query_similarities(
        &self,
        rows: &[(usize, &SlotPlan)],
        batch: &mut CpuBatch,
        out: &mut [f32],
    ) -> anyhow::Result<()> {
        let n_kv = self.geo.num_kv_heads;
        anyhow::ensure!(
            out.len() == rows.len() * n_kv,
            "{} similarities for {} rows",
            out.len(),
            rows.len()
        );
        for (&(row, dev), o) in rows.iter().zip(out.chunks_exact_mut(n_kv)) {
            group_similarity(&self.geo, |h| batch.q_row(row, h, 0), dev.query(), o);
        }
        Ok(())
    }

    fn select(
        &self,
        host: &HostTier<T>,
        rows: &mut [SelectRow<'_, SlotPlan>],
        _batch: &CpuBatch,
        scratch: &mut CpuScratch<T>,
    ) -> anyhow::Result<Vec<RecallStats>> {
        rows.iter_mut()
            .map(|r| {
                self.plan_selection(host, r.table, r.dev, &r.selection, r.heads, scratch)?;
                // In place, a recall only updates the tables.
                Ok(Self::apply_plan(r.dev, r.heads))
            })
            .collect()
    }

    fn attend(
        &self,
        host: &mut HostTier<T>,
        batch: &mut CpuBatch,
        job: Attend<'_, SlotPlan>,
        params: &AttnParams,
        scratch: &mut CpuScratch<T>,
    ) -> anyhow::Result<()> {
        match job {
            Attend::Decode(rows) => {
                self.attend_decode_rows(host, batch, rows, params, scratch);
            }
            Attend::Prefill(rows) => {
                for r in rows {
                    self.attend_prefill_row(host, batch, r, params, scratch);
                }
            }
        }
        Ok(())
    }

    fn read(
        &self,
        host: &HostTier<T>,
        batch: &mut CpuBatch,
        what: Read<'_>,
        out: &mut Vec<f32>,
    ) -> anyhow::Result<()> {
        match what {
            Read::Query { row } => {
                out.clear();
                for h in 0..self.geo.num_q_heads() {
                    out.extend_from_slice(batch.q_row(row, h, 0));
                }
                Ok(())
            }
            Read::Keys { table, len, head } => {
                read_host_keys(&self.geo, host, table, len, head, out)
            }
        }
    }
}

impl<T: KvElem> CpuBackend<T> {
    /// Writes one row's tokens into the host tier, summarising each page it fills.
    pub(crate) fn write_row(
        &self,
        host: &mut HostTier<T>,
        batch: &CpuBatch,
        w: &WriteRow<'_>,
        scratch: &mut CpuScratch<T>,
    ) {
        let p = self.geo.page_size;
        for j in 0..w.n {
            let pos = w.first_pos + j;
            let block = w.table[pos / p];
            for h in 0..self.geo.num_kv_heads {
                let (k, v) = batch.kv_row(w.row, h, j);
                host.write_row(block, h, pos % p, k, v);
            }
            if pos % p == p - 1 {
                host.summarise(block, self.summary, &mut scratch.rows);
            }
        }
    }

    /// Summarises the blocks of `full` where their summary is missing (prefix-cache hits,
    /// rebuilds). Returns how many were computed.
    pub(crate) fn ensure_summaries(
        &self,
        host: &mut HostTier<T>,
        full: &[u32],
        scratch: &mut CpuScratch<T>,
    ) -> usize {
        let mut n = 0;
        for &block in full {
            if !host.is_summarised(block) {
                host.summarise(block, self.summary, &mut scratch.rows);
                n += 1;
            }
        }
        n
    }

    /// The slot tables' share of [`Arrange::Reset`]: sink and window pages in their slots,
    /// the selected slots empty.
    pub(crate) fn reset_plan(&self, dev: &mut SlotPlan, len: usize) -> RecallStats {
        let g = &self.geo;
        dev.clear();
        let mut stats = RecallStats::default();
        for (page, slot) in g.fixed_pages(len) {
            for h in 0..g.num_kv_heads {
                dev.slots_mut(h)[slot] = page as u32;
            }
            stats.pages += g.num_kv_heads;
        }
        stats
    }

    /// Applies the pending plans of `heads` to the slot tables; counts the pages that enter.
    pub(crate) fn apply_plan(dev: &mut SlotPlan, heads: &[bool]) -> RecallStats {
        let pages = (0..heads.len())
            .filter(|&h| heads[h])
            .map(|h| dev.plan(h).iter().filter(|e| e.page != NO_PAGE).count())
            .sum();
        dev.apply_plans(heads);
        RecallStats { pages, bytes: 0 }
    }

    /// Scores and plans a selection (see [`Backend::select`]) without applying it.
    pub(crate) fn plan_selection(
        &self,
        host: &HostTier<T>,
        table: &[u32],
        dev: &mut SlotPlan,
        selection: &Selection,
        heads: &[bool],
        scratch: &mut CpuScratch<T>,
    ) -> anyhow::Result<()> {
        let (d, gs) = (self.geo.head_dim, self.geo.group);
        let sel = self.geo.selected_slots();
        let candidates = selection.candidates.clone();
        for h in (0..self.geo.num_kv_heads).filter(|&h| heads[h]) {
            let group_q = &dev.query()[h * gs * d..(h + 1) * gs * d];
            match selection.selector {
                Selector::Quest | Selector::Rerank => {
                    scratch.offsets.clear();
                    scratch.offsets.extend(
                        table[candidates.clone()]
                            .iter()
                            .map(|&b| host.summary_offset(b, h)),
                    );
                    // The rerank's shortlist: boxes shrunk to typical, pooled at the
                    // attention's temperature.
                    let rerank = selection.selector == Selector::Rerank;
                    let q: &[f32] = if rerank {
                        let scale = selection.params.softmax_scale;
                        scratch.scaled_q.clear();
                        scratch.scaled_q.extend(group_q.iter().map(|x| x * scale));
                        &scratch.scaled_q
                    } else {
                        group_q
                    };
                    // Bounds shrunk to a typical box; a centre +/- deviation box is one.
                    let shrink = match (rerank, self.summary) {
                        (true, SummaryKind::MinMax) => select::RERANK_SHRINK,
                        _ => 1.0,
                    };
                    select::pooled_box_scores(
                        q,
                        d,
                        host.summaries(),
                        &scratch.offsets,
                        self.pooling,
                        shrink,
                        &mut scratch.select,
                    );
                    if rerank {
                        select::rerank(
                            &self.geo,
                            host,
                            table,
                            h,
                            &scratch.scaled_q,
                            selection,
                            &mut scratch.select,
                        );
                    }
                }
                Selector::Oracle => {
                    let o = &mut scratch.oracle;
                    read_host_keys(&self.geo, host, table, selection.len, h, &mut o.keys)?;
                    o.scores(&self.geo, group_q, selection, &mut scratch.select.pooled);
                }
            }
            select::plan_replacement(
                &self.geo,
                candidates.clone(),
                &dev.slots(h)[sel.clone()],
                &mut scratch.select,
            );
            dev.set_plan(h, scratch.select.plan.iter().copied());
            dev.set_margin(h, scratch.select.margin);
        }
        Ok(())
    }

    /// Decode attention of every row. A step that attends over many tokens in all (long
    /// contexts, a large budget, many rows) runs its (row, KV head) pairs on rayon's pool (the
    /// engine's matmul threads are idle during attention).
    fn attend_decode_rows(
        &self,
        host: &HostTier<T>,
        batch: &mut CpuBatch,
        rows: &[AttendRow<'_, SlotPlan>],
        params: &AttnParams,
        scratch: &mut CpuScratch<T>,
    ) {
        let g = &self.geo;
        let (n_q, per_head) = (batch.n_q, g.group * g.head_dim);
        let width = n_q * g.head_dim;
        let attended: usize = rows
            .iter()
            .map(|r| match r.dev {
                Some(_) => r.len.min(g.slots * g.page_size),
                None => r.len,
            })
            .sum();
        let (q, out) = (&batch.q, &mut batch.out);
        if attended * g.num_kv_heads >= PARALLEL_DECODE && rayon::current_num_threads() > 1 {
            use rayon::prelude::*;
            // One query position per row: a row's heads are contiguous in q and out. Every
            // (row, KV head) pair of the job is one item, so a single row spreads over the
            // pool too.
            let n_kv = g.num_kv_heads;
            let mut job_of = vec![None; out.len() / width];
            for (j, r) in rows.iter().enumerate() {
                job_of[r.row] = Some(j);
            }
            out.par_chunks_mut(per_head)
                .zip(q.par_chunks(per_head))
                .enumerate()
                .filter_map(|(i, io)| job_of[i / n_kv].map(|j| (&rows[j], i % n_kv, io)))
                .for_each_init(AttnScratch::default, |sc, (r, h, (o, q))| {
                    self.decode_head(host, r, h, (q, o), params, sc)
                });
            return;
        }
        for r in rows {
            let span = r.row * width..(r.row + 1) * width;
            let (q, out) = (&q[span.clone()], &mut out[span]);
            for (h, (o, q)) in out.chunks_mut(per_head).zip(q.chunks(per_head)).enumerate() {
                self.decode_head(host, r, h, (q, o), params, &mut scratch.attn);
            }
        }
    }

    /// Causal prefill attention of one row.
    pub(crate) fn attend_prefill_row(
        &self,
        host: &HostTier<T>,
        batch: &mut CpuBatch,
        r: &CausalRow<'_>,
        params: &AttnParams,
        scratch: &mut CpuScratch<T>,
    ) {
        let (n_q, q_tokens, d) = (batch.n_q, batch.q_tokens, batch.d);
        let span = r.row * n_q * q_tokens * d..(r.row + 1) * n_q * q_tokens * d;
        let job = PrefillJob {
            geo: &self.geo,
            host,
            table: r.table,
            cached_len: r.cached_len,
            new_len: r.new_len,
            params,
            q: &batch.q[span.clone()],
            q_tokens,
        };
        job.run(&mut batch.out[span], &mut scratch.attn, &mut scratch.tile);
    }
}

/// KV head `head`'s keys of a sequence's first `len` tokens in `host`, `[len][d]` in f32.
pub(crate) fn read_host_keys<T: KvElem>(
    geo: &Geometry,
    host: &HostTier<T>,
    table: &[u32],
    len: usize,
    head: usize,
    out: &mut Vec<f32>,
) -> anyhow::Result<()> {
    let (p, d) = (geo.page_size, geo.head_dim);
    let pages = geo.pages(len);
    anyhow::ensure!(
        table.len() >= pages,
        "a block table of {} blocks for {len} tokens",
        table.len()
    );
    out.clear();
    out.resize(len * d, 0.0);
    for (j, &block) in table[..pages].iter().enumerate() {
        let n = geo.valid_tokens(j, len);
        T::to_f32s(
            &host.chunk(block, head)[..n * d],
            &mut out[j * p * d..(j * p + n) * d],
        );
    }
    Ok(())
}

/// Prefetches `seg` and adds the segment before it (one segment of look-ahead).
#[inline]
fn feed<'a, T: KvElem>(
    pending: &mut Option<Segment<'a, T>>,
    seg: Segment<'a, T>,
    att: &mut Attention<'_>,
    params: &AttnParams,
    d: usize,
) {
    seg.prefetch(d);
    if let Some(prev) = pending.replace(seg) {
        att.add(prev, params);
    }
}

impl<T: KvElem> CpuBackend<T> {
    /// The slot tables' share of [`Arrange::Advance`]: the page holding token `len - 1`
    /// takes its window slot, for every KV head.
    pub(crate) fn advance_window_plan(&self, plan: &mut SlotPlan, len: usize) {
        let g = &self.geo;
        let page = (len - 1) / g.page_size;
        let slot = g.window_slot(page);
        for h in 0..g.num_kv_heads {
            plan.slots_mut(h)[slot] = page as u32;
        }
    }

    /// Decode attention of KV head `h`'s query heads (`q` into `out`: `[G][d]`) of row `r`
    /// over its whole context (no working set) or its working set's slots.
    fn decode_head(
        &self,
        host: &HostTier<T>,
        r: &AttendRow<'_, SlotPlan>,
        h: usize,
        (q, out): (&[f32], &mut [f32]),
        params: &AttnParams,
        sc: &mut AttnScratch,
    ) {
        let (table, len, dev) = (r.table, r.len, r.dev);
        let g = &self.geo;
        let (p, d, gs) = (g.page_size, g.head_dim, g.group);
        let pos = len - 1;
        sc.q.clear();
        sc.q.extend_from_slice(q);
        sc.qpos.clear();
        sc.qpos.resize(gs, pos);
        let mut att = Attention::begin(sc, gs, d, params);
        // Each segment is added while the next one is being prefetched.
        let mut pending: Option<Segment<'_, T>> = None;
        match dev {
            None => {
                let first = params.first_visible(pos) / p;
                for (page, &block) in table.iter().enumerate().take(g.pages(len)).skip(first) {
                    let n = g.valid_tokens(page, len);
                    let seg = self.segment(host, block, h, n, page * p);
                    feed(&mut pending, seg, &mut att, params, d);
                }
            }
            Some(dev) => {
                for &page in dev.slots(h) {
                    if page == NO_PAGE {
                        continue;
                    }
                    let page = page as usize;
                    let n = g.valid_tokens(page, len);
                    if !att.any_visible(page * p, n) {
                        continue;
                    }
                    let seg = self.segment(host, table[page], h, n, page * p);
                    feed(&mut pending, seg, &mut att, params, d);
                }
            }
        }
        if let Some(last) = pending.take() {
            att.add(last, params);
        }
        for (r, o) in out.chunks_exact_mut(d).enumerate() {
            att.finish_row(r, o);
        }
    }

    fn check_heads(&self, batch: &CpuBatch) -> anyhow::Result<()> {
        let g = &self.geo;
        anyhow::ensure!(
            batch.n_q == g.num_q_heads() && batch.n_kv == g.num_kv_heads && batch.d == g.head_dim,
            "q/k/v have {} query heads, {} KV heads of dim {}; the model shape says {}, {} and {}",
            batch.n_q,
            batch.n_kv,
            batch.d,
            g.num_q_heads(),
            g.num_kv_heads,
            g.head_dim
        );
        Ok(())
    }
}
