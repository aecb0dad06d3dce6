//! The decode step of one layer: FreeKV's speculative-retrieval timeline, top to bottom.
//!
//! For each sequence of the batch at step `i` (context `L` tokens, query `q_i`):
//!
//! 1. **append** - write the new token's K/V into the host tier (summarising the page if it
//!    just filled; a backend may finish the write after the step, `Backend::settle`) and move
//!    the working set's window forward;
//! 2. **correct?** - by mode: `sync`, a first sparse step or a rebuild select with `q_i` and
//!    recall before attention for every head; `freekv` does so only for the KV heads whose
//!    query drifted (mean cosine over the group of `q_i` vs `q_{i-1}` below `tau`);
//!    `speculative` never does; the other heads keep the pages selected with `q_{i-1}`;
//! 3. **attend** - over the working set (sink + selected + window pages), or over every page
//!    while the sequence fits the budget (held by the working set where the backend says so)
//!    or the layer is dense;
//! 4. **schedule** - store `q_i` (mode `speculative`: the worker stores it, since only its
//!    selection reads it); in the speculative modes hand the layer to the background
//!    worker, which selects with `q_i` for the context of step `i + 1` and recalls the missing
//!    pages ([`background_selection`]), off the critical path. The next call for this layer
//!    joins that work before it starts (see `crate::instance`).
//!
//! So the pages a head attends over at step `i` are `select(q_{i-1}, candidates(L))`, or
//! `select(q_i, candidates(L))` when it was corrected (always, in `sync`).

use std::time::Instant;

use crate::backend::{Backend, Selection};
use crate::geometry::Geometry;
use crate::state::{LayerState, Phase, RowStep, SeqLayer, StepTrace};
use crate::{AttnParams, DecodeRow, FreeKvConfig, Mode, Policy, Selector};

/// What a step needs to know about its layer.
pub struct LayerCtx<'a, B> {
    pub backend: &'a B,
    pub config: &'a FreeKvConfig,
    /// The mode and selector in force (the configuration's, or what
    /// [`crate::AnyInstance::set_policy`] set since).
    pub policy: Policy,
    pub geo: Geometry,
    pub layer: usize,
    /// This layer always attends densely (listed in `dense_layers`, or mode `dense`).
    pub dense_layer: bool,
    pub num_blocks: usize,
    /// Record a [`StepTrace`] per sequence and step.
    pub tracing: bool,
}

/// One decode step of one layer for a batch (the rows of the loaded batch). Returns whether
/// background work was scheduled (the caller submits the layer to the worker).
pub fn decode_step<B: Backend>(
    cx: &LayerCtx<'_, B>,
    st: &mut LayerState<B>,
    rows: &[DecodeRow<'_>],
    params: &AttnParams,
) -> anyhow::Result<bool> {
    st.steps.clear();
    for (r, row) in rows.iter().enumerate() {
        let step = append(cx, st, r, row, params)?;
        st.steps.push(step);
    }
    test_drift(cx, st, rows)?;
    if cx.policy.selector == Selector::Oracle {
        // The oracle's softmax covers every token, the step's own too: a backend that writes
        // the step's tokens into the host tier after the step writes them now.
        cx.backend
            .settle(&mut st.host, &mut st.batch, &mut st.scratch)?;
    }
    for (r, row) in rows.iter().enumerate() {
        correct(cx, st, r, row.seq_id)?;
    }
    for (r, row) in rows.iter().enumerate() {
        attend(cx, st, r, row.seq_id, params)?;
    }
    let mut scheduled = false;
    for (r, row) in rows.iter().enumerate() {
        scheduled |= schedule(cx, st, r, row.seq_id);
    }
    Ok(scheduled)
}

/// 1. Writes the row's token and decides how the step goes. A context length that does not
///    continue the sequence (the engine trimmed or re-fed it) rebuilds its state from the
///    host tier.
fn append<B: Backend>(
    cx: &LayerCtx<'_, B>,
    st: &mut LayerState<B>,
    r: usize,
    row: &DecodeRow<'_>,
    params: &AttnParams,
) -> anyhow::Result<RowStep> {
    let geo = &cx.geo;
    let len = row.context_len;
    let seq = st.seqs.get_mut(&row.seq_id).ok_or_else(|| {
        anyhow::anyhow!(
            "layer {}: decode for sequence {} which has no FreeKV state (no prefill was seen for it, or it was freed)",
            cx.layer,
            row.seq_id
        )
    })?;
    if let Some(failure) = seq.failure.take() {
        anyhow::bail!(
            "layer {}, sequence {}: the background selection for this step failed: {failure}",
            cx.layer,
            row.seq_id
        );
    }
    cx.check_table(row.seq_id, row.block_table, len)?;
    let known = geo.pages(seq.len).min(seq.table.len());
    let continuing = len == seq.len + 1 && row.block_table[..known] == seq.table[..known];
    seq.table.clear();
    seq.table
        .extend_from_slice(&row.block_table[..geo.pages(len)]);
    seq.len = len;
    seq.params = *params;
    seq.trace = None;
    seq.query_row = None;
    seq.fresh.clear();
    cx.backend.write_tokens(
        &mut st.host,
        &seq.table,
        &mut st.batch,
        r,
        len - 1,
        1,
        &mut st.scratch,
    )?;
    if !continuing {
        cx.backend.ensure_summaries(
            &mut st.host,
            &seq.table,
            len / geo.page_size,
            &mut st.scratch,
        )?;
        seq.forget();
        seq.counters.rebuilds += 1;
    }
    seq.counters.decode_steps += 1;
    if cx.dense_layer || !geo.is_sparse(len) {
        seq.forget();
        if cx.dense_layer || !cx.backend.holds_short_contexts() {
            return Ok(RowStep::Dense);
        }
        let dev = match &mut seq.dev {
            Some(dev) => dev,
            none => none.insert(cx.backend.alloc_device_tier()?),
        };
        let stats = cx
            .backend
            .hold_every_page(&st.host, &seq.table, dev, len, &st.batch, r)?;
        seq.counters.add_recall(stats);
        return Ok(RowStep::Whole);
    }
    seq.counters.sparse_steps += 1;
    let selected = seq.has_selection();
    if seq.dev.is_none() {
        seq.dev = Some(cx.backend.alloc_device_tier()?);
    }
    let dev = seq.dev.as_mut().expect("allocated above");
    if selected {
        cx.backend
            .advance_window(&seq.table, dev, len, &st.batch, r)?;
        Ok(RowStep::Speculated)
    } else {
        let stats = cx
            .backend
            .reset_working_set(&st.host, &seq.table, dev, len)?;
        seq.counters.add_recall(stats);
        // The new token enters the window as on every step, wherever the host tier has it.
        cx.backend
            .advance_window(&seq.table, dev, len, &st.batch, r)?;
        Ok(RowStep::Fresh)
    }
}

impl<B> LayerCtx<'_, B> {
    /// A selection for the step whose context is `context` tokens, with the query stored
    /// when the sequence had `len` tokens in the host tier.
    fn selection(&self, context: usize, len: usize, params: &AttnParams) -> Selection {
        Selection {
            candidates: self.geo.candidates(context, params),
            len,
            params: *params,
            selector: self.policy.selector,
            shortlist: self.policy.shortlist,
        }
    }

    /// The block table of a `len`-token context must cover it and name blocks the host tier
    /// has (prompt and decode rows alike).
    pub fn check_table(&self, seq_id: u64, table: &[u32], len: usize) -> anyhow::Result<()> {
        let pages = self.geo.pages(len);
        anyhow::ensure!(len > 0, "sequence {seq_id}: context length 0");
        anyhow::ensure!(
            table.len() >= pages,
            "sequence {seq_id}: block table has {} blocks, but {len} tokens need {pages} of {} tokens",
            table.len(),
            self.geo.page_size
        );
        if let Some(&bad) = table[..pages]
            .iter()
            .find(|&&b| b as usize >= self.num_blocks)
        {
            anyhow::bail!(
                "sequence {seq_id}: block id {bad} is outside the host tier's {} blocks",
                self.num_blocks
            );
        }
        Ok(())
    }
}

/// Whether row `r`'s step runs the correction test (mode `freekv`, a step that attends over
/// a speculated selection).
fn tests_drift<B: Backend>(cx: &LayerCtx<'_, B>, st: &LayerState<B>, r: usize) -> bool {
    cx.policy.mode.correction() && st.steps[r] == RowStep::Speculated
}

/// 2a. The correction test of every row that runs it, in one backend call (on a device, one
///     wait for the similarities): row `st.tested[i]`'s in `st.similarity[i * n_kv..]`.
fn test_drift<B: Backend>(
    cx: &LayerCtx<'_, B>,
    st: &mut LayerState<B>,
    rows: &[DecodeRow<'_>],
) -> anyhow::Result<()> {
    st.tested.clear();
    for r in 0..rows.len() {
        if tests_drift(cx, st, r) {
            st.tested.push(r);
        }
    }
    if st.tested.is_empty() {
        return Ok(());
    }
    let LayerState {
        seqs,
        batch,
        similarity,
        tested,
        ..
    } = st;
    let devs = tested
        .iter()
        .map(|&r| {
            let seq = &seqs[&rows[r].seq_id];
            (r, seq.dev.as_ref().expect("sparse rows have a working set"))
        })
        .collect::<Vec<_>>();
    similarity.clear();
    similarity.resize(tested.len() * cx.geo.num_kv_heads, 0.0);
    cx.backend.query_similarities(&devs, batch, similarity)
}

/// 2. The selection that must happen before attention, by step and mode.
fn correct<B: Backend>(
    cx: &LayerCtx<'_, B>,
    st: &mut LayerState<B>,
    r: usize,
    seq_id: u64,
) -> anyhow::Result<()> {
    let step = st.steps[r];
    if matches!(step, RowStep::Dense | RowStep::Whole) {
        return Ok(());
    }
    let LayerState {
        host,
        seqs,
        batch,
        scratch,
        similarity,
        tested,
        heads,
        all_heads,
        threshold,
        ..
    } = st;
    let seq = seqs.get_mut(&seq_id).expect("appended above");
    let counters = &mut seq.counters;
    let dev = seq.dev.as_mut().expect("sparse rows have a working set");
    let mut trace = StepTrace {
        len: seq.len,
        sparse: true,
        ..Default::default()
    };
    let all = step == RowStep::Fresh || cx.policy.mode == Mode::Sync;
    if all {
        heads.copy_from_slice(all_heads);
        trace.blocking = true;
        counters.blocking_selections += 1;
    } else if let Some(i) = tested.iter().position(|&t| t == r) {
        let n_kv = heads.len();
        let similarity = &similarity[i * n_kv..(i + 1) * n_kv];
        threshold.decide(similarity, heads);
        for &s in similarity.iter() {
            counters.similarity_histogram[crate::counters::similarity_bin(s)] += 1;
        }
        counters.heads_checked += heads.len() as u64;
        counters.heads_corrected += heads.iter().filter(|&&h| h).count() as u64;
        if cx.tracing {
            trace.corrected = heads.clone();
        }
    } else {
        heads.fill(false);
    }
    let n = heads.iter().filter(|&&h| h).count();
    if all || n > 0 || !cx.policy.mode.speculation() {
        cx.backend.store_query(dev, batch, r, 0)?;
    } else {
        // Only the worker's selection (and the next step's correction test) reads it: stored
        // there, off the critical path.
        seq.query_row = Some(r);
    }
    if n > 0 {
        let t = Instant::now();
        let selection = cx.selection(seq.len, seq.len, &seq.params);
        cx.backend
            .select(host, &seq.table, dev, &selection, heads, scratch)?;
        let stats = cx.backend.recall(host, &seq.table, dev, heads, scratch)?;
        seq.fresh.clone_from(heads);
        seq.fresh_candidates = selection.candidates;
        counters.head_selections += n as u64;
        counters.add_recall(stats);
        counters.blocking_ns += t.elapsed().as_nanos() as u64;
    }
    seq.select();
    if cx.tracing {
        seq.trace = Some(trace);
    }
    Ok(())
}

/// 3. Attention over the working set (or every page).
fn attend<B: Backend>(
    cx: &LayerCtx<'_, B>,
    st: &mut LayerState<B>,
    r: usize,
    seq_id: u64,
    params: &AttnParams,
) -> anyhow::Result<()> {
    let step = st.steps[r];
    let LayerState {
        host,
        seqs,
        batch,
        scratch,
        ..
    } = st;
    let seq = seqs.get_mut(&seq_id).expect("appended above");
    let dev = match step {
        RowStep::Dense => None,
        _ => seq.dev.as_ref(),
    };
    cx.backend
        .attend_decode(host, &seq.table, seq.len, dev, batch, r, params, scratch)?;
    if cx.tracing {
        let trace = seq.trace.get_or_insert_with(|| StepTrace {
            len: seq.len,
            ..Default::default()
        });
        // The pages of a sparse step (a whole context's are every page).
        if let Some(dev) = dev.filter(|_| step != RowStep::Whole) {
            trace.pages = (0..cx.geo.num_kv_heads)
                .map(|h| cx.backend.resident_pages(dev, h, seq.len))
                .collect::<anyhow::Result<_>>()?;
        }
    }
    Ok(())
}

/// 4. Queues the next step's selection and recall (speculative modes).
fn schedule<B: Backend>(
    cx: &LayerCtx<'_, B>,
    st: &mut LayerState<B>,
    r: usize,
    seq_id: u64,
) -> bool {
    if matches!(st.steps[r], RowStep::Dense | RowStep::Whole) || !cx.policy.mode.speculation() {
        return false;
    }
    let seq = st.seqs.get_mut(&seq_id).expect("appended above");
    seq.speculate();
    true
}

/// The worker's share of step `i` for one layer: the host-tier writes the step deferred
/// ([`Backend::settle`]), then for every sequence that scheduled it, store `q_i` if the step
/// left that to the worker, select with it over the candidates of step `i + 1` and recall
/// the missing pages. A sequence whose selection fails keeps the error for its next step
/// (which reports it) and loses its selection; the other sequences are not affected.
pub fn background_selection<B: Backend>(
    cx: &LayerCtx<'_, B>,
    st: &mut LayerState<B>,
    scratch: &mut B::Scratch,
) {
    let LayerState {
        host,
        seqs,
        batch,
        all_heads,
        ..
    } = st;
    let settled = cx.backend.settle(host, batch, scratch);
    for seq in seqs.values_mut().filter(|s| s.phase == Phase::Speculating) {
        let t = Instant::now();
        let selected = settled
            .as_ref()
            .map_err(|e| anyhow::anyhow!("{e:#}"))
            .and_then(|()| match (seq.query_row.take(), seq.dev.as_mut()) {
                (Some(r), Some(dev)) => cx.backend.store_query(dev, batch, r, 0),
                _ => Ok(()),
            })
            .and_then(|()| select_for_next_step(cx, host, seq, all_heads, scratch));
        if let Err(e) = selected {
            seq.forget();
            seq.failure = Some(format!("{e:#}"));
        }
        seq.counters.background_ns += t.elapsed().as_nanos() as u64;
    }
}

/// Selection with the stored query over the candidates of the sequence's next step, and the
/// recall, for the heads in `heads` (counted in the sequence's counters). A head this step
/// already selected with the same query over the same candidates keeps that selection (the
/// selection would be the same: every winner resident, nothing to recall).
pub fn select_for_next_step<B: Backend>(
    cx: &LayerCtx<'_, B>,
    host: &B::HostTier,
    seq: &mut SeqLayer<B>,
    heads: &[bool],
    scratch: &mut B::Scratch,
) -> anyhow::Result<()> {
    let Some(dev) = seq.dev.as_mut() else {
        seq.forget();
        return Ok(());
    };
    let selection = cx.selection(seq.len + 1, seq.len, &seq.params);
    // The heads left to select, in `seq.fresh` (emptied after).
    let repeat = !seq.fresh.is_empty() && seq.fresh_candidates == selection.candidates;
    seq.fresh.resize(heads.len(), false);
    for (left, &h) in seq.fresh.iter_mut().zip(heads) {
        *left = h && !(repeat && *left);
    }
    let heads = &seq.fresh;
    if heads.iter().any(|&h| h) {
        cx.backend
            .select(host, &seq.table, dev, &selection, heads, scratch)?;
        let stats = cx.backend.recall(host, &seq.table, dev, heads, scratch)?;
        seq.counters.head_selections += heads.iter().filter(|&&h| h).count() as u64;
        seq.counters.add_recall(stats);
    }
    seq.fresh.clear();
    seq.select();
    Ok(())
}
