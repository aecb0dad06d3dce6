//! A sequence within the budget on a retrieving layer, on a device that attends over working
//! sets: its working set holds every page (page `j` in its sink or window slot, or in
//! selectable slot `j - sink_pages`), each page copied in once and each new token appended,
//! so its decode runs on the device like a sparse step's.

use anyhow::Context;

use crate::backend::cpu::elem::KvElem;
use crate::backend::RecallStats;

use super::{
    token_rows, ChunkMove, DeviceOps, HostTierOf, OffloadBackend, OffloadBatch, OffloadTier,
};

impl<T: KvElem, O: DeviceOps<T>> OffloadBackend<T, O> {
    /// [`Arrange::HoldEvery`](crate::backend::Arrange::HoldEvery): only what
    /// changed since the previous step moves (the new page, and the page leaving the window
    /// for its selectable slot); any other context is installed whole.
    pub(super) fn hold_whole_context(
        &self,
        host: &HostTierOf<T, O>,
        table: &[u32],
        dev: &mut OffloadTier<T, O::Slots, O::Query>,
        len: usize,
        batch: &OffloadBatch<O::Batch, O::Staged>,
        row: usize,
    ) -> anyhow::Result<RecallStats> {
        let g = &self.geo;
        let pages = g.pages(len);
        anyhow::ensure!(
            !g.is_sparse(len) && table.len() >= pages,
            "a working set cannot hold all {pages} pages of a {len}-token context ({} slots, \
             a table of {} blocks)",
            g.slots,
            table.len()
        );
        // One more token of the context the slots hold: only what changed moves.
        let grown =
            dev.held_len > 0 && dev.held_len + 1 == len && table[..dev.held.len()] == dev.held[..];
        if !grown {
            dev.plan.clear();
        }
        let window = g.window_start(len).max(g.sink_pages);
        let selectable = g.selected_slots().start;
        let mut moves = Vec::new();
        let mut last_slot = 0;
        for (page, &block) in table[..pages].iter().enumerate() {
            let slot = if page < g.sink_pages {
                page
            } else if page >= window {
                g.window_slot(page)
            } else {
                selectable + page - g.sink_pages
            };
            last_slot = slot;
            for h in 0..g.num_kv_heads {
                let held = &mut dev.plan.slots_mut(h)[slot];
                if *held != page as u32 {
                    *held = page as u32;
                    moves.push(ChunkMove {
                        block,
                        head: h as u32,
                        slot: slot as u32,
                    });
                }
            }
        }
        self.ops
            .move_chunks(&host.tier, &mut dev.slots, &moves, None)
            .context("copying a short context's pages into its working set")?;
        // The new token goes in as an append, also where its page moved: the host tier may
        // not hold it yet (`Backend::settle`).
        self.append_from_batch(dev, last_slot, len - 1, batch, row)?;
        dev.held.clear();
        dev.held.extend_from_slice(&table[..pages]);
        dev.held_len = len;
        Ok(RecallStats {
            pages: moves.len(),
            bytes: moves.len() * self.chunk_bytes(),
        })
    }

    /// Appends token `pos` (from batch row `row`) to `slot` of a working set.
    pub(super) fn append_from_batch(
        &self,
        dev: &mut OffloadTier<T, O::Slots, O::Query>,
        slot: usize,
        pos: usize,
        batch: &OffloadBatch<O::Batch, O::Staged>,
        row: usize,
    ) -> anyhow::Result<()> {
        let rows = token_rows(&self.geo, batch, row, &mut dev.new_token);
        self.ops
            .append_token(&mut dev.slots, slot, pos % self.geo.page_size, rows)
            .context("appending the new token to its window slot")
    }
}
