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
//!    pages ([`crate::background`]), off the critical path. The next call for this layer
//!    joins that work before it starts (see `crate::instance`).
//!
//! So the pages a head attends over at step `i` are `select(q_{i-1}, candidates(L))`, or
//! `select(q_i, candidates(L))` when it was corrected (always, in `sync`).

use std::time::Instant;

use crate::backend::{
    Arrange, ArrangeRow, Attend, AttendRow, Backend, SelectRow, Selection, StoreQuery, WriteRow,
};
use crate::correction::Threshold;
use crate::geometry::Geometry;
use crate::state::{LayerState, RowStep, SeqLayer, StepTrace};
use crate::step_plan::{PlannedRow, StepPlan};
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
///
/// The step is planned first ([`plan_step`]: no device work), then each stage runs over every
/// row: the writes, the correction test and the attention as one backend call each.
pub fn decode_step<B: Backend>(
    cx: &LayerCtx<'_, B>,
    st: &mut LayerState<B>,
    rows: &[DecodeRow<'_>],
    params: &AttnParams,
) -> anyhow::Result<bool> {
    st.plan = plan_step(cx, st, rows, params)?;
    let LayerState {
        host,
        seqs,
        batch,
        scratch,
        plan,
        similarity,
        heads,
        all_heads,
        threshold,
        ..
    } = &mut *st;
    let mut seqs = seqs_by_row(plan, seqs)?;
    // 1. append: every row's token into the host tier, then each working set moves.
    let writes: Vec<WriteRow<'_>> = plan
        .rows
        .iter()
        .zip(&seqs)
        .enumerate()
        .map(|(r, (p, seq))| WriteRow {
            table: &seq.table,
            row: r,
            first_pos: p.len - 1,
            n: 1,
            summarised_pages: if p.rebuild {
                p.len / cx.geo.page_size
            } else {
                0
            },
        })
        .collect();
    cx.backend.write(host, batch, &writes, scratch)?;
    arrange(cx, host, batch, plan, &mut seqs)?;
    test_drift(cx, plan, &seqs, batch, similarity)?;
    if cx.policy.selector == Selector::Oracle {
        // The oracle's softmax covers every token, the step's own too: a backend that writes
        // the step's tokens into the host tier after the step writes them now.
        cx.backend.settle(host, batch, scratch)?;
    }
    // 2. correct: the selections that must happen before attention.
    let mut cor = Correction {
        heads,
        all_heads,
        threshold,
    };
    correct(
        cx,
        (host, batch, scratch),
        &mut cor,
        plan,
        &mut seqs,
        similarity,
    )?;
    // 3. attend: every row in one call.
    let attend: Vec<AttendRow<'_, B::DeviceTier>> = plan
        .rows
        .iter()
        .zip(&seqs)
        .enumerate()
        .map(|(r, (p, seq))| AttendRow {
            table: &seq.table,
            len: p.len,
            dev: match p.step {
                RowStep::Dense => None,
                _ => seq.dev.as_ref(),
            },
            row: r,
        })
        .collect();
    cx.backend
        .attend(host, batch, Attend::Decode(&attend), params, scratch)?;
    // 4. schedule: the next step's selection goes to the worker (speculative modes).
    let mut scheduled = false;
    for (p, seq) in plan.rows.iter().zip(seqs.iter_mut()) {
        if cx.tracing {
            trace(cx, seq, p);
        }
        if !matches!(p.step, RowStep::Dense | RowStep::Whole) && cx.policy.mode.speculation() {
            seq.speculate();
            scheduled = true;
        }
    }
    Ok(scheduled)
}

/// The sequences of the plan's rows, in row order (each found once per step).
fn seqs_by_row<'a, B: Backend>(
    plan: &StepPlan,
    seqs: &'a mut std::collections::HashMap<u64, SeqLayer<B>>,
) -> anyhow::Result<Vec<&'a mut SeqLayer<B>>> {
    let mut by_row: Vec<Option<&mut SeqLayer<B>>> = (0..plan.rows.len()).map(|_| None).collect();
    for (id, seq) in seqs.iter_mut() {
        if let Some(r) = plan.row_of(*id) {
            by_row[r] = Some(seq);
        }
    }
    by_row
        .into_iter()
        .zip(&plan.rows)
        .map(|(s, p)| s.ok_or_else(|| anyhow::anyhow!("sequence {} has no state", p.seq_id)))
        .collect()
}

/// Plans the step: checks each row against its sequence's state and decides how its step
/// goes (no device work). A context length that does not continue the sequence (the engine
/// trimmed or re-fed it) rebuilds its state from the host tier.
pub fn plan_step<B: Backend>(
    cx: &LayerCtx<'_, B>,
    st: &mut LayerState<B>,
    rows: &[DecodeRow<'_>],
    params: &AttnParams,
) -> anyhow::Result<StepPlan> {
    let geo = &cx.geo;
    let mut plan = std::mem::take(&mut st.plan);
    plan.rows.clear();
    for row in rows {
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
        if !continuing {
            seq.forget();
            seq.counters.rebuilds += 1;
        }
        seq.counters.decode_steps += 1;
        let step = if cx.dense_layer || !geo.is_sparse(len) {
            seq.forget();
            if cx.dense_layer || !cx.backend.holds_short_contexts() {
                RowStep::Dense
            } else {
                RowStep::Whole
            }
        } else {
            seq.counters.sparse_steps += 1;
            if seq.has_selection() {
                RowStep::Speculated
            } else {
                RowStep::Fresh
            }
        };
        plan.rows.push(PlannedRow {
            seq_id: row.seq_id,
            len,
            step,
            rebuild: !continuing,
            tests_drift: cx.policy.mode.correction() && step == RowStep::Speculated,
        });
    }
    plan.check()?;
    Ok(plan)
}

/// 1b. Every row's working set for its step, in one backend call: every page of a short
///     context, the window moved forward over a speculated selection, or the sink and window
///     installed afresh.
fn arrange<B: Backend>(
    cx: &LayerCtx<'_, B>,
    host: &B::HostTier,
    batch: &B::Batch,
    plan: &StepPlan,
    seqs: &mut [&mut SeqLayer<B>],
) -> anyhow::Result<()> {
    let mut rows = Vec::with_capacity(seqs.len());
    let mut arranged = Vec::with_capacity(seqs.len());
    for (r, (p, seq)) in plan.rows.iter().zip(seqs.iter_mut()).enumerate() {
        let how = match p.step {
            RowStep::Dense => continue,
            RowStep::Whole => Arrange::HoldEvery { row: r },
            RowStep::Speculated => Arrange::Advance { row: r },
            RowStep::Fresh => Arrange::Fresh { row: r },
        };
        let SeqLayer { table, dev, .. } = &mut **seq;
        let dev = match dev {
            Some(dev) => dev,
            none => none.insert(cx.backend.alloc_device_tier()?),
        };
        rows.push(ArrangeRow {
            table,
            dev,
            len: p.len,
            how,
        });
        arranged.push(r);
    }
    let stats = if rows.is_empty() {
        Vec::new()
    } else {
        cx.backend.arrange(host, &mut rows, batch)?
    };
    drop(rows);
    for (r, stats) in arranged.into_iter().zip(stats) {
        seqs[r].counters.add_recall(stats);
    }
    Ok(())
}

impl<B> LayerCtx<'_, B> {
    /// A selection for the step whose context is `context` tokens, with the query stored
    /// when the sequence had `len` tokens in the host tier.
    pub(crate) fn selection(&self, context: usize, len: usize, params: &AttnParams) -> Selection {
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

/// 2a. The correction test of every row the plan marks, in one backend call (on a device, one
///     wait for the similarities): the `i`-th tested row's in `similarity[i * n_kv..]`.
fn test_drift<B: Backend>(
    cx: &LayerCtx<'_, B>,
    plan: &StepPlan,
    seqs: &[&mut SeqLayer<B>],
    batch: &mut B::Batch,
    similarity: &mut Vec<f32>,
) -> anyhow::Result<()> {
    similarity.clear();
    let devs = plan
        .tested()
        .map(|r| {
            let dev = seqs[r].dev.as_ref();
            dev.map(|d| (r, d))
                .ok_or_else(|| anyhow::anyhow!("a speculated row without a working set"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    if devs.is_empty() {
        return Ok(());
    }
    similarity.resize(devs.len() * cx.geo.num_kv_heads, 0.0);
    cx.backend.query_similarities(&devs, batch, similarity)
}

/// The correction test's per-head buffers and thresholds of a layer.
struct Correction<'a> {
    /// Per row, the KV heads that select before attention (`[rows][n_kv]`).
    heads: &'a mut Vec<bool>,
    all_heads: &'a [bool],
    threshold: &'a mut Threshold,
}

/// What the correction stage decided for one sparse row.
struct Corrected {
    /// Its query is stored now (otherwise by the worker).
    store: bool,
    /// KV heads that select now.
    selecting: usize,
    trace: StepTrace,
}

/// 2. The selections that must happen before attention, by step and mode (`similarity`: the
///    correction test of the plan's tested rows, in row order): each row decides which heads
///    select (no device work); then the queries are stored and the selections run, one
///    backend call each for the batch.
fn correct<B: Backend>(
    cx: &LayerCtx<'_, B>,
    (host, batch, scratch): (&B::HostTier, &mut B::Batch, &mut B::Scratch),
    cor: &mut Correction<'_>,
    plan: &StepPlan,
    seqs: &mut [&mut SeqLayer<B>],
    similarity: &[f32],
) -> anyhow::Result<()> {
    let n_kv = cx.geo.num_kv_heads;
    cor.heads.clear();
    cor.heads.resize(plan.rows.len() * n_kv, false);
    let mut tested = similarity.chunks_exact(n_kv);
    let mut decided: Vec<Option<Corrected>> = Vec::with_capacity(seqs.len());
    for (r, (p, seq)) in plan.rows.iter().zip(seqs.iter_mut()).enumerate() {
        let sims = if p.tests_drift { tested.next() } else { None };
        if matches!(p.step, RowStep::Dense | RowStep::Whole) {
            decided.push(None);
            continue;
        }
        anyhow::ensure!(seq.dev.is_some(), "a sparse row without a working set");
        let heads = &mut cor.heads[r * n_kv..(r + 1) * n_kv];
        decided.push(Some(decide(
            cx,
            cor.all_heads,
            cor.threshold,
            seq,
            p,
            sims,
            heads,
        )));
    }
    // Stored now where a selection reads it now (or nothing else would: mode `sync`);
    // otherwise only the worker's selection and the next step's correction test read it,
    // and the worker stores it, off the critical path.
    let mut stores = Vec::new();
    for (r, (seq, c)) in seqs.iter_mut().zip(&decided).enumerate() {
        match c {
            Some(c) if c.store => stores.push(StoreQuery {
                dev: seq.dev.as_mut().expect("checked above"),
                row: r,
                token: 0,
            }),
            Some(_) => seq.query_row = Some(r),
            None => {}
        }
    }
    if !stores.is_empty() {
        cx.backend.store_query(&mut stores, batch)?;
    }
    drop(stores);
    let t = Instant::now();
    let mut selects = Vec::new();
    for (r, (seq, c)) in seqs.iter_mut().zip(&decided).enumerate() {
        if c.as_ref().is_some_and(|c| c.selecting > 0) {
            let selection = cx.selection(seq.len, seq.len, &seq.params);
            let SeqLayer { table, dev, .. } = &mut **seq;
            selects.push(SelectRow {
                table,
                dev: dev.as_mut().expect("checked above"),
                selection,
                heads: &cor.heads[r * n_kv..(r + 1) * n_kv],
                // A row that selects now stored its query from this step's row (above).
                query_row: Some(r),
            });
        }
    }
    let candidates: Vec<_> = selects
        .iter()
        .map(|s| s.selection.candidates.clone())
        .collect();
    let stats = if selects.is_empty() {
        Vec::new()
    } else {
        cx.backend.select(host, &mut selects, batch, scratch)?
    };
    drop(selects);
    // The selections' blocking time, shared by the rows that selected.
    let blocking_ns = t.elapsed().as_nanos() as u64 / candidates.len().max(1) as u64;
    let mut selected = stats.into_iter().zip(candidates);
    for (r, (seq, c)) in seqs.iter_mut().zip(decided).enumerate() {
        let Some(c) = c else { continue };
        if c.selecting > 0 {
            let (stats, candidates) = selected.next().expect("one result per selecting row");
            seq.fresh.clear();
            seq.fresh
                .extend_from_slice(&cor.heads[r * n_kv..(r + 1) * n_kv]);
            seq.fresh_candidates = candidates;
            seq.counters.head_selections += c.selecting as u64;
            seq.counters.add_recall(stats);
            seq.counters.blocking_ns += blocking_ns;
        }
        seq.select();
        if cx.tracing {
            seq.trace = Some(c.trace);
        }
    }
    Ok(())
}

/// Which KV heads of one sparse row select before attention (into `heads`), counted in the
/// row's counters: every head at a fresh step or in mode `sync`; the heads the correction
/// test flags where it ran; none otherwise.
fn decide<B: Backend>(
    cx: &LayerCtx<'_, B>,
    all_heads: &[bool],
    threshold: &mut Threshold,
    seq: &mut SeqLayer<B>,
    p: &PlannedRow,
    similarity: Option<&[f32]>,
    heads: &mut [bool],
) -> Corrected {
    let counters = &mut seq.counters;
    let mut trace = StepTrace {
        len: seq.len,
        sparse: true,
        ..Default::default()
    };
    let all = p.step == RowStep::Fresh || cx.policy.mode == Mode::Sync;
    if all {
        heads.copy_from_slice(all_heads);
        trace.blocking = true;
        counters.blocking_selections += 1;
    } else if let Some(similarity) = similarity {
        threshold.decide(similarity, heads);
        for &s in similarity.iter() {
            counters.similarity_histogram[crate::counters::similarity_bin(s)] += 1;
        }
        counters.heads_checked += heads.len() as u64;
        counters.heads_corrected += heads.iter().filter(|&&h| h).count() as u64;
        if cx.tracing {
            trace.corrected = heads.to_vec();
        }
    } else {
        heads.fill(false);
    }
    let selecting = heads.iter().filter(|&&h| h).count();
    Corrected {
        store: all || selecting > 0 || !cx.policy.mode.speculation(),
        selecting,
        trace,
    }
}

/// The step's trace: the pages each head attended (a sparse step's; a whole context's are
/// every page).
fn trace<B: Backend>(cx: &LayerCtx<'_, B>, seq: &mut SeqLayer<B>, p: &PlannedRow) {
    let trace = seq.trace.get_or_insert_with(|| StepTrace {
        len: p.len,
        ..Default::default()
    });
    if let Some(dev) = seq
        .dev
        .as_ref()
        .filter(|_| matches!(p.step, RowStep::Speculated | RowStep::Fresh))
    {
        let plan = B::slot_plan(dev);
        trace.pages = (0..cx.geo.num_kv_heads)
            .map(|h| plan.resident_pages(h))
            .collect();
    }
}
