//! A dense layer's pages on the device: every block of the layer's pool has a slot (block `b`
//! in slot `b`), written as the host tier is, so its decode runs on the device through a slot
//! index. A block whose copy failed is marked stale and read from the host tier until a
//! whole-page copy succeeds.

use anyhow::Context;

use crate::backend::cpu::elem::KvElem;
use crate::backend::WriteRow;

use super::{
    token_rows, ChunkMove, DeviceOps, HostTierOf, OffloadBackend, OffloadBatch, OffloadScratch,
};

impl<T: KvElem, O: DeviceOps<T>> OffloadBackend<T, O> {
    /// Mirrors the tokens `first_pos..first_pos + n` of a dense layer (just written to the
    /// host tier) into its pages on the device: one token from the batch's row, more as the
    /// pages that hold them.
    pub(super) fn mirror_tokens(
        &self,
        host: &mut HostTierOf<T, O>,
        batch: &OffloadBatch<O::Batch, O::Staged>,
        w: &WriteRow<'_>,
        scratch: &mut OffloadScratch<T, O::Scratch>,
    ) -> anyhow::Result<()> {
        let (table, row, first_pos, n) = (w.table, w.row, w.first_pos, w.n);
        let Some(pages) = host.pages.as_mut() else {
            return Ok(());
        };
        let g = &self.geo;
        let p = g.page_size;
        let touched = &table[first_pos / p..(first_pos + n).div_ceil(p)];
        // Until it is known to have landed, the device's copy of these pages may be stale.
        let was_stale = touched.iter().any(|&b| host.stale[b as usize]);
        for &b in touched {
            host.stale[b as usize] = true;
        }
        if n == 1 && !was_stale {
            let rows = token_rows(g, batch, row, &mut scratch.row);
            let block = table[first_pos / p] as usize;
            self.ops
                .append_token(pages, block, first_pos % p, rows)
                .context("appending the new token to a dense layer's pages on the device")?;
            host.stale[block] = false;
            return Ok(());
        }
        scratch.moves.clear();
        for &block in touched {
            scratch
                .moves
                .extend((0..g.num_kv_heads as u32).map(|head| ChunkMove {
                    block,
                    head,
                    slot: block,
                }));
        }
        self.ops
            .move_chunks(&host.tier, pages, &scratch.moves, Some(&mut scratch.device))
            .with_context(|| {
                format!(
                    "copying {} pages of a dense layer to the device",
                    touched.len()
                )
            })?;
        for &b in touched {
            host.stale[b as usize] = false;
        }
        Ok(())
    }
}
