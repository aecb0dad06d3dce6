//! A prompt on one layer: write its pages, optionally compute its causal attention, then
//! build each sequence's state with the first selection made with the last prompt query.
//!
//! The first selection serves the first decode step speculatively (the paper's efficiency
//! code does the same): it is `select(q_last_prompt, candidates(len + 1))`.

use std::time::Instant;

use crate::backend::{Arrange, ArrangeRow, Attend, Backend, CausalRow, StoreQuery, WriteRow};
use crate::background::select_for_next_step;
use crate::state::{LayerState, SeqLayer};
use crate::timeline::LayerCtx;
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
    let tables: Vec<&[u32]> = rows
        .iter()
        .map(|row| &row.block_table[..geo.pages(row.cached_len + row.new_len)])
        .collect();
    // 1. Every new token into the host tier; summaries for every full page (including a
    //    cached prefix written by another sequence).
    let writes: Vec<WriteRow<'_>> = rows
        .iter()
        .zip(&tables)
        .enumerate()
        .map(|(r, (row, table))| WriteRow {
            table,
            row: r,
            first_pos: row.cached_len,
            n: row.new_len,
            summarised_pages: (row.cached_len + row.new_len) / geo.page_size,
        })
        .collect();
    cx.backend
        .write(&mut st.host, &mut st.batch, &writes, &mut st.scratch)?;
    // 2. Dense causal attention of the new queries over cached + new keys.
    if want_output {
        let causal: Vec<CausalRow<'_>> = rows
            .iter()
            .zip(&tables)
            .enumerate()
            .map(|(r, (row, table))| CausalRow {
                table,
                cached_len: row.cached_len,
                new_len: row.new_len,
                row: r,
            })
            .collect();
        cx.backend.attend(
            &mut st.host,
            &mut st.batch,
            Attend::Prefill(&causal),
            params,
            &mut st.scratch,
        )?;
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
        let mut one = [ArrangeRow {
            table: &seq.table,
            dev,
            len: total,
            how: Arrange::Reset,
        }];
        let stats = cx.backend.arrange(host, &mut one, batch)?;
        let [ArrangeRow { dev, .. }] = one;
        let mut one = [StoreQuery {
            dev,
            row: r,
            token: row.new_len - 1,
        }];
        cx.backend.store_query(&mut one, batch)?;
        seq.counters
            .add_recall(stats.into_iter().next().unwrap_or_default());
        select_for_next_step(cx, host, seq, all_heads, batch, scratch)?;
        seq.counters.blocking_ns += t.elapsed().as_nanos() as u64;
    }
    Ok(())
}
