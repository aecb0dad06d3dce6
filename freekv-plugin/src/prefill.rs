//! A prompt on one layer: write its pages, optionally compute its causal attention, then
//! build each sequence's state with the first selection made with the last prompt query.
//!
//! The first selection serves the first decode step speculatively (the paper's efficiency
//! code does the same): it is `select(q_last_prompt, candidates(len + 1))`.

use std::time::Instant;

use crate::backend::Backend;
use crate::state::{LayerState, SeqLayer};
use crate::timeline::{select_for_next_step, LayerCtx};
use crate::{AttnParams, PrefillRow};

/// Checks one prompt row against the batch and the host tier.
pub fn check_row<B>(
    cx: &LayerCtx<'_, B>,
    row: &PrefillRow<'_>,
    max_len: usize,
) -> anyhow::Result<()> {
    let total = row.cached_len + row.new_len;
    anyhow::ensure!(
        row.new_len >= 1 && row.new_len <= max_len,
        "sequence {}: {} new prompt tokens in a batch of length {max_len}",
        row.seq_id,
        row.new_len
    );
    cx.check_table(row.seq_id, row.block_table, total)
}

/// Prefill of one layer for the loaded batch.
pub fn prefill_step<B: Backend>(
    cx: &LayerCtx<'_, B>,
    st: &mut LayerState<B>,
    rows: &[PrefillRow<'_>],
    params: &AttnParams,
    want_output: bool,
) -> anyhow::Result<()> {
    let geo = cx.geo;
    // 1. Every new token into the host tier; summaries for every full page (including a
    //    cached prefix written by another sequence).
    for (r, row) in rows.iter().enumerate() {
        let total = row.cached_len + row.new_len;
        let table = &row.block_table[..geo.pages(total)];
        cx.backend.write_tokens(
            &mut st.host,
            table,
            &mut st.batch,
            r,
            row.cached_len,
            row.new_len,
            &mut st.scratch,
        )?;
        cx.backend
            .ensure_summaries(&mut st.host, table, total / geo.page_size, &mut st.scratch)?;
    }
    // 2. Dense causal attention of the new queries over cached + new keys.
    if want_output {
        for (r, row) in rows.iter().enumerate() {
            let table = &row.block_table[..geo.pages(row.cached_len + row.new_len)];
            cx.backend.attend_prefill(
                &st.host,
                table,
                row.cached_len,
                row.new_len,
                &mut st.batch,
                r,
                params,
                &mut st.scratch,
            )?;
        }
    }
    // 3. The sequences' state and their first selection.
    let LayerState {
        host,
        seqs,
        batch,
        scratch,
        all_heads,
        ..
    } = st;
    for (r, row) in rows.iter().enumerate() {
        let total = row.cached_len + row.new_len;
        let seq = seqs.entry(row.seq_id).or_insert_with(SeqLayer::new);
        seq.len = total;
        seq.table.clear();
        seq.table
            .extend_from_slice(&row.block_table[..geo.pages(total)]);
        seq.params = *params;
        seq.forget();
        seq.trace = None;
        seq.failure = None;
        seq.query_row = None;
        seq.counters.prefill_tokens += row.new_len as u64;
        if want_output {
            seq.counters.prefill_attended += row.new_len as u64;
        }
        if cx.dense_layer || !geo.is_sparse(total + 1) {
            continue;
        }
        let t = Instant::now();
        if seq.dev.is_none() {
            seq.dev = Some(cx.backend.alloc_device_tier()?);
        }
        let dev = seq.dev.as_mut().expect("allocated above");
        let stats = cx.backend.reset_working_set(host, &seq.table, dev, total)?;
        seq.counters.add_recall(stats);
        cx.backend.store_query(dev, batch, r, row.new_len - 1)?;
        select_for_next_step(cx, host, seq, all_heads, scratch)?;
        seq.counters.blocking_ns += t.elapsed().as_nanos() as u64;
    }
    Ok(())
}
