//! Where the probe meets a decode step: after the step of a layer, each row's query and its
//! sequence's keys, read through the backend, are measured head by head.

use crate::backend::{Backend, Read};
use crate::state::{LayerState, RowStep};
use crate::timeline::LayerCtx;
use crate::DecodeRow;

use super::measure_head;

/// Measures the decode step just run on this layer (a no-op without a probe, on a layer
/// listed dense, and for contexts within the budget). A measurement that fails (a device
/// error while reading keys) stops the layer's probe and is reported by the next
/// [`crate::AnyInstance::take_probe`]; the step itself is done and keeps its output.
pub(crate) fn probe_decode<B: Backend>(
    cx: &LayerCtx<'_, B>,
    st: &mut LayerState<B>,
    rows: &[DecodeRow<'_>],
) {
    if st.probe.is_none() || cx.config.dense_layers.contains(&cx.layer) {
        return;
    }
    if let Err(e) = measure_rows(cx, st, rows) {
        if let Some(lp) = st.probe.as_mut() {
            lp.fail(format!("layer {}: {e:#}", cx.layer));
        }
    }
}

fn measure_rows<B: Backend>(
    cx: &LayerCtx<'_, B>,
    st: &mut LayerState<B>,
    rows: &[DecodeRow<'_>],
) -> anyhow::Result<()> {
    // The step's tokens into the host tier first (a device writes them after the step).
    cx.backend
        .settle(&mut st.host, &mut st.batch, &mut st.scratch)?;
    let LayerState {
        host,
        seqs,
        batch,
        plan,
        probe,
        ..
    } = st;
    let Some(lp) = probe.as_mut().filter(|lp| lp.failure.is_none()) else {
        return Ok(());
    };
    let (d, gs) = (cx.geo.head_dim, cx.geo.group);
    for (r, row) in rows.iter().enumerate() {
        let seq = &seqs[&row.seq_id];
        let len = seq.len;
        if !cx.geo.is_sparse(len) {
            continue;
        }
        let mut query = std::mem::take(&mut lp.m.q);
        cx.backend
            .read(host, batch, Read::Query { row: r }, &mut query)?;
        let attended = match (plan.rows[r].step, seq.dev.as_ref()) {
            (RowStep::Speculated | RowStep::Fresh, Some(dev)) => Some(B::slot_plan(dev)),
            _ => None,
        };
        for h in 0..cx.geo.num_kv_heads {
            let keys = Read::Keys {
                table: &seq.table,
                len,
                head: h,
            };
            cx.backend.read(host, batch, keys, &mut lp.m.keys)?;
            lp.m.q.clear();
            lp.m.q
                .extend_from_slice(&query[h * gs * d..(h + 1) * gs * d]);
            let resident = attended.map(|plan| plan.resident_pages(h));
            measure_head(lp, &seq.params, len, cx.layer, h, resident.as_deref());
        }
        lp.m.q = query;
    }
    Ok(())
}
