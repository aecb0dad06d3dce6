//! Selection on a device: the candidates scored from the device's mirror of the page
//! summaries, the top-k and replacement plan on the host, and the recall of the missing pages.

use std::ops::Range;

use anyhow::Context;

use crate::backend::cpu::elem::KvElem;
use crate::backend::cpu::select::plan_replacement;
use crate::backend::cpu::CpuBackend;
use crate::backend::{Memory, RecallStats, Selection};
use crate::geometry::NO_PAGE;
use crate::Selector;

use super::{
    ChunkMove, DeviceOps, HostTierOf, OffloadBackend, OffloadScratch, OffloadTier, PageScoring,
};

impl<T: KvElem, O: DeviceOps<T>> OffloadBackend<T, O> {
    /// The Quest scores of the candidates for the heads in `heads`, pooled on the device from
    /// its mirror of the summaries, into `scratch.scores` (`[n_kv][candidates]`).
    pub(super) fn score_on_device(
        &self,
        host: &<Self as Memory>::HostTier,
        table: &[u32],
        dev: &<Self as Memory>::DeviceTier,
        candidates: &Range<usize>,
        heads: &[bool],
        scratch: &mut <Self as Memory>::Scratch,
    ) -> anyhow::Result<()> {
        let Some(mirror) = host.summaries.as_ref() else {
            anyhow::bail!(
                "page selection on a layer allocated as dense (no page summaries on the device)"
            );
        };
        scratch.blocks.clear();
        scratch.blocks.extend_from_slice(&table[candidates.clone()]);
        let stale = (!host.unmirrored.is_empty())
            .then(|| scratch.blocks.iter().find(|b| host.unmirrored.contains(b)))
            .flatten();
        if let Some(b) = stale {
            anyhow::bail!(
                "the device's summary of block {b} is stale after a failed copy (copied \
                 again at the layer's next call)"
            );
        }
        self.ops
            .score_pages(
                mirror,
                &PageScoring {
                    blocks: &scratch.blocks,
                    query: dev.plan.query(),
                    heads,
                    pooling: self.pooling,
                },
                &mut scratch.scores,
                &mut scratch.device,
            )
            .context("scoring the candidate pages")
    }

    /// Scores and plans a selection (see [`Backend::select`]) without recalling it.
    pub(super) fn plan_selection(
        &self,
        host: &HostTierOf<T, O>,
        table: &[u32],
        dev: &mut OffloadTier<T, O::Slots, O::Query>,
        selection: &Selection,
        heads: &[bool],
        scratch: &mut OffloadScratch<T, O::Scratch>,
    ) -> anyhow::Result<()> {
        if selection.selector != Selector::Quest {
            // Selectors that read keys run on the host, over the host tier, as on the CPU. The
            // oracle's softmax covers every token: the caller settles the step's first.
            anyhow::ensure!(
                selection.selector != Selector::Oracle || host.pending.is_empty(),
                "an oracle selection before the step's tokens reached the host tier"
            );
            return self.cpu.plan_selection(
                &host.tier,
                table,
                &mut dev.plan,
                selection,
                heads,
                &mut scratch.cpu,
            );
        }
        let g = &self.geo;
        let candidates = selection.candidates.clone();
        let n = candidates.len();
        scratch.scores.clear();
        scratch.scores.resize(g.num_kv_heads * n, 0.0);
        self.score_on_device(host, table, dev, &candidates, heads, scratch)?;
        let sel = g.selected_slots();
        for h in (0..g.num_kv_heads).filter(|&h| heads[h]) {
            let sc = &mut scratch.select;
            sc.pooled.clear();
            sc.pooled
                .extend_from_slice(&scratch.scores[h * n..(h + 1) * n]);
            plan_replacement(g, candidates.clone(), &dev.plan.slots(h)[sel.clone()], sc);
            dev.plan.set_plan(h, sc.plan.iter().copied());
            dev.plan.set_margin(h, sc.margin);
        }
        Ok(())
    }

    /// Applies the pending plan of the heads in `heads`: brings the missing pages into their
    /// slots.
    pub(super) fn recall(
        &self,
        host: &HostTierOf<T, O>,
        table: &[u32],
        dev: &mut OffloadTier<T, O::Slots, O::Query>,
        heads: &[bool],
        scratch: &mut OffloadScratch<T, O::Scratch>,
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
        let mut stats = CpuBackend::<T>::apply_plan(&mut dev.plan, heads);
        debug_assert_eq!(stats.pages, scratch.moves.len());
        stats.bytes = stats.pages * self.chunk_bytes();
        Ok(stats)
    }
}
