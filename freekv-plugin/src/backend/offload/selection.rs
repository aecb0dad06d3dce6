//! Selection on a device: the candidates scored, the top-k and each head's replacement plan
//! made by the device from its mirror of the page summaries, and the recall of the missing
//! pages; every sequence of a layer-step in one call each.

use anyhow::Context;

use crate::backend::cpu::elem::KvElem;
use crate::backend::cpu::CpuBackend;
use crate::backend::{RecallStats, SelectRow};
use crate::geometry::NO_PAGE;
use crate::Selector;

use super::{
    Call, ChunkMove, DeviceOps, DeviceTierOf, HostTierOf, OffloadBackend, OffloadBatch,
    OffloadScratch, PageSelection, SelectQuery, SlotMoves,
};

impl<T: KvElem, O: DeviceOps<T>> OffloadBackend<T, O> {
    /// Plans the selections of `rows` (see [`Backend::select`]) without recalling them: the
    /// selectors that read keys on the host, row by row; every `quest` row on the device, all
    /// in one call (one wait for the device per call).
    pub(super) fn plan_selections(
        &self,
        host: &HostTierOf<T, O>,
        rows: &mut [SelectRow<'_, DeviceTierOf<T, O>>],
        batch: &OffloadBatch<O::Batch, O::Staged>,
        scratch: &mut OffloadScratch<T, O::Scratch>,
    ) -> anyhow::Result<()> {
        for r in rows
            .iter_mut()
            .filter(|r| r.selection.selector != Selector::Quest)
        {
            // The oracle's softmax covers every token: the caller settles the step's first.
            anyhow::ensure!(
                r.selection.selector != Selector::Oracle || host.pending.is_empty(),
                "an oracle selection before the step's tokens reached the host tier"
            );
            self.cpu.plan_selection(
                &host.tier,
                r.table,
                &mut r.dev.plan,
                &r.selection,
                r.heads,
                &mut scratch.cpu,
            )?;
        }
        let quest: Vec<usize> = (0..rows.len())
            .filter(|&i| rows[i].selection.selector == Selector::Quest)
            .collect();
        if quest.is_empty() {
            return Ok(());
        }
        self.select_on_device(host, rows, &quest, batch, scratch)?;
        let n_kv = self.geo.num_kv_heads;
        for (k, &i) in quest.iter().enumerate() {
            let r = &mut rows[i];
            for h in (0..n_kv).filter(|&h| r.heads[h]) {
                let plans = &scratch.plans;
                r.dev
                    .plan
                    .set_plan(h, plans.plan(k * n_kv + h).iter().copied());
                r.dev.plan.set_margin(h, plans.margin(k * n_kv + h));
            }
        }
        Ok(())
    }

    /// Selects for `rows[i]` of each `i` of `quest` on the device, from its mirror of the
    /// summaries: the `k`-th row's plans into `scratch.plans` (rows `k * n_kv + head`). A
    /// row's query is read in place from the loaded decode step where it was stored from there
    /// and the step's values were read on the host (so the device has long produced them);
    /// otherwise from the stored query on the host.
    fn select_on_device(
        &self,
        host: &HostTierOf<T, O>,
        rows: &[SelectRow<'_, DeviceTierOf<T, O>>],
        quest: &[usize],
        batch: &OffloadBatch<O::Batch, O::Staged>,
        scratch: &mut OffloadScratch<T, O::Scratch>,
    ) -> anyhow::Result<()> {
        let Some(mirror) = host.summaries.as_ref() else {
            anyhow::bail!(
                "page selection on a layer allocated as dense (no page summaries on the device)"
            );
        };
        let sel = self.geo.selected_slots();
        let OffloadScratch {
            blocks,
            resident,
            plans,
            device,
            ..
        } = scratch;
        blocks.clear();
        resident.clear();
        let mut spans = Vec::with_capacity(quest.len());
        for &i in quest {
            let r = &rows[i];
            let start = blocks.len();
            blocks.extend_from_slice(&r.table[r.selection.candidates.clone()]);
            spans.push(start..blocks.len());
            for h in 0..self.geo.num_kv_heads {
                resident.extend_from_slice(&r.dev.plan.slots(h)[sel.clone()]);
            }
        }
        let stale = (!host.unmirrored.is_empty())
            .then(|| blocks.iter().find(|b| host.unmirrored.contains(b)))
            .flatten();
        if let Some(b) = stale {
            anyhow::bail!(
                "the device's summary of block {b} is stale after a failed copy (copied \
                 again at the layer's next call)"
            );
        }
        let w = self.geo.num_kv_heads * self.geo.sel_pages;
        let in_place = matches!(
            batch.call,
            Call::Decode {
                host_loaded: true,
                ..
            }
        );
        let jobs: Vec<PageSelection<'_>> = quest
            .iter()
            .zip(spans)
            .enumerate()
            .map(|(k, (&i, span))| PageSelection {
                blocks: &blocks[span],
                first: rows[i].selection.candidates.start,
                query: match rows[i].query_row {
                    Some(row) if in_place => SelectQuery::Batch(row),
                    _ => SelectQuery::Host(rows[i].dev.plan.query()),
                },
                heads: rows[i].heads,
                pooling: self.pooling,
                resident: &resident[k * w..(k + 1) * w],
            })
            .collect();
        self.ops
            .select_pages(mirror, &batch.dev, &jobs, plans, device)
            .context("selecting the pages on the device")
    }

    /// Applies the pending plans of `rows` (each row's heads): brings the missing pages into
    /// their slots, every row's in one call to the device. Returns what each row moved.
    pub(super) fn recall_rows(
        &self,
        host: &HostTierOf<T, O>,
        rows: &mut [SelectRow<'_, DeviceTierOf<T, O>>],
        scratch: &mut OffloadScratch<T, O::Scratch>,
    ) -> anyhow::Result<Vec<RecallStats>> {
        let g = &self.geo;
        let OffloadScratch { moves, device, .. } = scratch;
        moves.clear();
        let mut spans = Vec::with_capacity(rows.len());
        for r in rows.iter_mut() {
            r.dev.held_len = 0;
            let start = moves.len();
            for h in (0..g.num_kv_heads).filter(|&h| r.heads[h]) {
                for e in r.dev.plan.plan(h) {
                    if e.page != NO_PAGE {
                        moves.push(ChunkMove {
                            block: r.table[e.page as usize],
                            head: h as u32,
                            slot: e.slot,
                        });
                    }
                }
            }
            spans.push(start..moves.len());
        }
        let mut sets: Vec<SlotMoves<'_, O::Slots>> = rows
            .iter_mut()
            .zip(&spans)
            .filter(|(_, span)| !span.is_empty())
            .map(|(r, span)| SlotMoves {
                slots: &mut r.dev.slots,
                moves: &moves[span.clone()],
            })
            .collect();
        self.ops
            .move_chunks_into_sets(&host.tier, &mut sets, Some(device))
            .context("recalling the selected pages")?;
        drop(sets);
        // The tables follow the data (and the plans are consumed).
        Ok(rows
            .iter_mut()
            .zip(spans)
            .map(|(r, span)| {
                let mut stats = CpuBackend::<T>::apply_plan(&mut r.dev.plan, r.heads);
                debug_assert_eq!(stats.pages, span.len());
                stats.bytes = stats.pages * self.chunk_bytes();
                stats
            })
            .collect())
    }
}
