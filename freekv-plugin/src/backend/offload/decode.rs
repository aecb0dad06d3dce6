//! Decode attention of a step's rows: the rows whose working set (or dense pages) the device
//! holds in one device call, the others (a stale dense page, a softcap the kernels do not take)
//! on the host over the host tier.

use anyhow::Context;

use crate::backend::cpu::elem::KvElem;
use crate::backend::{Attend, AttendRow, Backend};
use crate::geometry::NO_PAGE;
use crate::plan::SlotPlan;
use crate::AttnParams;

use super::{
    visible_span, DecodeDesc, DeviceOps, DeviceTierOf, HostTierOf, OffloadBackend, OffloadBatch,
    OffloadScratch,
};

impl<T: KvElem, O: DeviceOps<T>> OffloadBackend<T, O> {
    /// [`Attend::Decode`]: the rows the device attends in one call, the others on the host.
    pub(super) fn attend_decode_rows(
        &self,
        host: &mut HostTierOf<T, O>,
        batch: &mut OffloadBatch<O::Batch, O::Staged>,
        rows: &[AttendRow<'_, DeviceTierOf<T, O>>],
        params: &AttnParams,
        scratch: &mut OffloadScratch<T, O::Scratch>,
    ) -> anyhow::Result<()> {
        let g = &self.geo;
        let n_kv = g.num_kv_heads;
        let pages_on_device = |r: &AttendRow<'_, _>| {
            host.pages.is_some()
                && !r.table[..g.pages(r.len)]
                    .iter()
                    .any(|&b| host.stale[b as usize])
        };
        let on_device = |r: &AttendRow<'_, _>| {
            batch.on_device()
                && Self::decode_on_device(params)
                && (r.dev.is_some() || pages_on_device(r))
        };
        let (device_rows, host_rows): (Vec<_>, Vec<_>) = rows.iter().partition(|r| on_device(r));
        if !host_rows.is_empty() {
            // The host tier (dense), or the host chunks the tables name, with this step's
            // tokens in place.
            self.settle(host, batch, scratch)?;
            let values = self.host_values(batch)?;
            let plans: Vec<AttendRow<'_, SlotPlan>> = host_rows
                .iter()
                .map(|r| AttendRow {
                    table: r.table,
                    len: r.len,
                    dev: r.dev.map(|d| &d.plan),
                    row: r.row,
                })
                .collect();
            self.cpu.attend(
                &mut host.tier,
                values,
                Attend::Decode(&plans),
                params,
                &mut scratch.cpu,
            )?;
            if batch.on_device() {
                batch.host_rows.extend(host_rows.iter().map(|r| r.row));
            }
        }
        if device_rows.is_empty() {
            return Ok(());
        }
        // Per row, the attended tokens of each slot (from the slot tables, or every page of
        // the context), cut at the sliding window's start; a dense layer's pages by index.
        scratch.slot_len.clear();
        scratch.index.clear();
        let mut spans = Vec::with_capacity(device_rows.len());
        for r in &device_rows {
            let first = params.first_visible(r.len - 1);
            let span = |page: usize| visible_span(g, first, page, r.len);
            let (len0, index0) = (scratch.slot_len.len(), scratch.index.len());
            match r.dev {
                Some(dev) => {
                    scratch.slot_len.resize(len0 + g.slots * n_kv, 0);
                    let lens = &mut scratch.slot_len[len0..];
                    for h in 0..n_kv {
                        for (slot, &page) in dev.plan.slots(h).iter().enumerate() {
                            if page != NO_PAGE {
                                lens[slot * n_kv + h] = span(page as usize);
                            }
                        }
                    }
                }
                None => {
                    let visible = first / g.page_size..g.pages(r.len);
                    scratch.index.extend_from_slice(&r.table[visible.clone()]);
                    for page in visible {
                        scratch
                            .slot_len
                            .extend(std::iter::repeat_n(span(page), n_kv));
                    }
                }
            }
            spans.push((len0..scratch.slot_len.len(), index0..scratch.index.len()));
        }
        let pages = host.pages.as_ref();
        let mut descs = Vec::with_capacity(device_rows.len());
        for (r, (lens, index)) in device_rows.iter().zip(spans) {
            let (slots, index) = match r.dev {
                Some(dev) => (&dev.slots, None),
                None => (
                    pages.context("a dense layer's pages are not on the device")?,
                    Some(&scratch.index[index]),
                ),
            };
            descs.push(DecodeDesc {
                slots,
                index,
                slot_len: &scratch.slot_len[lens],
                row: r.row,
            });
        }
        self.ops
            .decode(&descs, &mut batch.dev, params, &mut scratch.device)
            .context("decode attention on the device")
    }
}
