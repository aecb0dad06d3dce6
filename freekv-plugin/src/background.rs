//! The worker's share of a decode step (FreeKV's speculative retrieval, off the critical
//! path): after layer `l`'s step `i`, the host-tier writes the step deferred, the stored query
//! `q_i` where the step left it to the worker, and the selection with `q_i` over the
//! candidates of step `i + 1`, with the recall of the missing pages, for every sequence that
//! scheduled it: one backend call for all of them (on a GPU, one selection launch set and one
//! wait for the device per layer-step).

use std::time::Instant;

use crate::backend::{Backend, SelectRow, StoreQuery};
use crate::state::{LayerState, Phase, SeqLayer};
use crate::timeline::LayerCtx;

/// The worker's share of step `i` for one layer: the host-tier writes the step deferred
/// ([`Backend::settle`]), then for every sequence that scheduled it, store `q_i` if the step
/// left that to the worker, select with it over the candidates of step `i + 1` and recall
/// the missing pages, every sequence in one selection call. A sequence whose selection fails
/// keeps the error for its next step (which reports it) and loses its selection; the other
/// sequences are not affected (a failed call of several sequences is retried one by one, so
/// the failure is charged to the sequence it belongs to).
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
    let mut ready: Vec<&mut SeqLayer<B>> = Vec::new();
    // The step's row each stored query was read from here (None: stored at the step).
    let mut query_rows = Vec::new();
    for seq in seqs.values_mut().filter(|s| s.phase == Phase::Speculating) {
        let t = Instant::now();
        let query_row = seq.query_row.take();
        let stored = settled
            .as_ref()
            .map_err(|e| anyhow::anyhow!("{e:#}"))
            .and_then(|()| match (query_row, seq.dev.as_mut()) {
                (Some(row), Some(dev)) => {
                    let mut one = [StoreQuery { dev, row, token: 0 }];
                    cx.backend.store_query(&mut one, batch)
                }
                _ => Ok(()),
            });
        seq.counters.background_ns += t.elapsed().as_nanos() as u64;
        match stored {
            Ok(()) => {
                ready.push(seq);
                query_rows.push(query_row);
            }
            Err(e) => fail(seq, e),
        }
    }
    let t = Instant::now();
    let together = ready.len() > 1;
    let selected =
        select_for_next_steps(cx, host, &mut ready, &query_rows, all_heads, batch, scratch);
    let share = t.elapsed().as_nanos() as u64 / ready.len().max(1) as u64;
    for seq in ready.iter_mut() {
        seq.counters.background_ns += share;
    }
    match selected {
        Ok(()) => {}
        Err(e) if !together => {
            if let Some(seq) = ready.pop() {
                fail(seq, e);
            }
        }
        Err(_) => {
            for (seq, query_row) in ready.into_iter().zip(query_rows) {
                let t = Instant::now();
                let mut one = [&mut *seq];
                let selected = select_for_next_steps(
                    cx,
                    host,
                    &mut one,
                    &[query_row],
                    all_heads,
                    batch,
                    scratch,
                );
                if let Err(e) = selected {
                    fail(seq, e);
                }
                seq.counters.background_ns += t.elapsed().as_nanos() as u64;
            }
        }
    }
}

/// A background failure: the sequence loses its selection and reports `e` at its next step.
fn fail<B: Backend>(seq: &mut SeqLayer<B>, e: anyhow::Error) {
    seq.forget();
    seq.failure = Some(format!("{e:#}"));
}

/// Selection with the stored query over the candidates of the sequence's next step, and the
/// recall, for the heads in `heads` (counted in the sequence's counters). A head this step
/// already selected with the same query over the same candidates keeps that selection (the
/// selection would be the same: every winner resident, nothing to recall). `batch`: the
/// layer's loaded call (a prompt's, whose rows no device reads in place).
pub fn select_for_next_step<B: Backend>(
    cx: &LayerCtx<'_, B>,
    host: &B::HostTier,
    seq: &mut SeqLayer<B>,
    heads: &[bool],
    batch: &B::Batch,
    scratch: &mut B::Scratch,
) -> anyhow::Result<()> {
    select_for_next_steps(cx, host, &mut [seq], &[None], heads, batch, scratch)
}

/// [`select_for_next_step`] for several sequences, in one selection call; `query_rows[i]`:
/// the row of the loaded decode step whose query `seqs[i]` stored, if it stored it from there
/// (see `SelectRow::query_row`). On an error no sequence's state says it selected (each still
/// holds what it held and may select again).
fn select_for_next_steps<B: Backend>(
    cx: &LayerCtx<'_, B>,
    host: &B::HostTier,
    seqs: &mut [&mut SeqLayer<B>],
    query_rows: &[Option<usize>],
    heads: &[bool],
    batch: &B::Batch,
    scratch: &mut B::Scratch,
) -> anyhow::Result<()> {
    let n_kv = heads.len();
    // Per selecting sequence: its index, selection and the heads left to select (in `left`).
    let mut picks = Vec::new();
    let mut left: Vec<bool> = Vec::new();
    for (i, seq) in seqs.iter_mut().enumerate() {
        if seq.dev.is_none() {
            continue;
        }
        let selection = cx.selection(seq.len + 1, seq.len, &seq.params);
        let repeat = !seq.fresh.is_empty() && seq.fresh_candidates == selection.candidates;
        let start = left.len();
        left.extend(
            heads
                .iter()
                .enumerate()
                .map(|(h, &on)| on && !(repeat && seq.fresh.get(h).copied().unwrap_or(false))),
        );
        let selecting = left[start..].iter().filter(|&&h| h).count();
        if selecting > 0 {
            picks.push((i, selection, selecting));
        } else {
            left.truncate(start);
        }
    }
    if !picks.is_empty() {
        let mut rows = Vec::with_capacity(picks.len());
        let mut next = picks.iter().zip(left.chunks(n_kv)).peekable();
        for (i, seq) in seqs.iter_mut().enumerate() {
            let Some(((_, selection, _), heads)) = next.next_if(|((p, _, _), _)| *p == i) else {
                continue;
            };
            let SeqLayer { table, dev, .. } = &mut **seq;
            rows.push(SelectRow {
                table,
                dev: dev.as_mut().expect("picked with a working set"),
                selection: selection.clone(),
                heads,
                query_row: query_rows[i],
            });
        }
        let stats = cx.backend.select(host, &mut rows, batch, scratch)?;
        drop(rows);
        for ((i, _, selecting), stats) in picks.iter().zip(stats) {
            let seq = &mut seqs[*i];
            seq.counters.head_selections += *selecting as u64;
            seq.counters.add_recall(stats);
        }
    }
    for seq in seqs.iter_mut() {
        if seq.dev.is_none() {
            seq.forget();
        } else {
            seq.fresh.clear();
            seq.select();
        }
    }
    Ok(())
}
