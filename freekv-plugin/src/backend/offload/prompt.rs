//! FreeKV's prefill attention on the device (a prompt with a cached prefix, or one the engine's
//! attention does not serve): a prompt row's context in slots on the device (a dense layer's
//! own pages, or a copy of the row's pages from the host tier for the call), and each new query
//! attended like a decode row over the pages up to its position (causal, sliding windows cut by
//! the spans), so the decode kernels serve prompts too.

use anyhow::Context;
use candle_core::{DType, Tensor};

use crate::backend::cpu::elem::KvElem;
use crate::backend::{Backend, CausalRow};
use crate::AttnParams;

use super::{
    visible_span, Call, ChunkMove, DecodeDesc, DeviceOps, HostTierOf, OffloadBackend, OffloadBatch,
    OffloadScratch,
};

/// Prompt queries per device batch (bounds the staged decode descriptors of one batch).
const PROMPT_CHUNK: usize = 256;

/// A prompt batch's tensors where the device attends it, and each row's output.
pub struct DevicePrompt {
    /// q `(B, Hq, L, D)`, k and v `(B, Hkv, L, D)`, as the engine gave them.
    pub(super) inputs: [Tensor; 3],
    /// Per row: its output `(Hq, L, D)` once the device attended it.
    pub(super) out: Vec<Option<Tensor>>,
}

impl<T: KvElem, O: DeviceOps<T>> OffloadBackend<T, O> {
    /// Attends prompt row `row` on the device. Returns false, having done nothing, where the
    /// row's pages do not fit in device memory beside what it holds (the host attends it).
    pub(super) fn attend_prompt_on_device(
        &self,
        host: &HostTierOf<T, O>,
        r: &CausalRow<'_>,
        batch: &mut OffloadBatch<O::Batch, O::Staged>,
        params: &AttnParams,
        scratch: &mut OffloadScratch<T, O::Scratch>,
    ) -> anyhow::Result<bool> {
        let (table, cached_len, new_len, row) = (r.table, r.cached_len, r.new_len, r.row);
        let g = &self.geo;
        let (n_kv, p) = (g.num_kv_heads, g.page_size);
        let pages = g.pages(cached_len + new_len);
        let prompt = batch
            .prompt()
            .context("no prompt batch is loaded on the device")?;
        // The row's queries (and keys, values) as the rows of a decode batch: (L, H, D).
        let [q, k, v] = [0, 1, 2].map(|i| {
            prompt.inputs[i]
                .get(row)
                .and_then(|t| t.transpose(0, 1))
                .and_then(|t| t.contiguous())
        });
        let (q, k, v) = (q?, k?, v?);
        let out_dtype = q.dtype();
        // Where the row's pages are on the device.
        let dense_pages = host
            .pages
            .as_ref()
            .filter(|_| !table[..pages].iter().any(|&b| host.stale[b as usize]));
        let copied;
        let (slots, index) = match dense_pages {
            Some(pages_on_device) => (pages_on_device, table[..pages].to_vec()),
            None => {
                let Ok(mut own) = self.ops.alloc_slots(pages) else {
                    return Ok(false);
                };
                scratch.moves.clear();
                for (slot, &block) in table[..pages].iter().enumerate() {
                    scratch.moves.extend((0..n_kv as u32).map(|head| ChunkMove {
                        block,
                        head,
                        slot: slot as u32,
                    }));
                }
                self.ops
                    .move_chunks(
                        &host.tier,
                        &mut own,
                        &scratch.moves,
                        Some(&mut scratch.device),
                    )
                    .context("copying a prompt's context to the device")?;
                copied = own;
                (&copied, (0..pages as u32).collect())
            }
        };
        // The queries in chunks, so that one batch's staged descriptors stay bounded.
        let mut outs = Vec::new();
        for start in (0..new_len).step_by(PROMPT_CHUNK) {
            let n = PROMPT_CHUNK.min(new_len - start);
            let mut rows = self.ops.alloc_batch();
            self.ops
                .load_batch(
                    &mut rows,
                    &q.narrow(0, start, n)?,
                    &k.narrow(0, start, n)?,
                    &v.narrow(0, start, n)?,
                )
                .context("loading a prompt's queries on the device")?;
            // Query `start + j` sits at `pos` and sees the keys `first..=pos`: one decode
            // row each, all in one call.
            scratch.slot_len.clear();
            let mut spans = Vec::with_capacity(n);
            for j in 0..n {
                let pos = cached_len + start + j;
                let first = params.first_visible(pos);
                let visible = first / p..g.pages(pos + 1);
                let lens0 = scratch.slot_len.len();
                for page in visible.clone() {
                    let span = visible_span(g, first, page, pos + 1);
                    scratch.slot_len.extend(std::iter::repeat_n(span, n_kv));
                }
                spans.push((lens0..scratch.slot_len.len(), visible));
            }
            let descs: Vec<_> = spans
                .into_iter()
                .enumerate()
                .map(|(j, (lens, visible))| DecodeDesc {
                    slots,
                    index: Some(&index[visible]),
                    slot_len: &scratch.slot_len[lens],
                    row: j,
                })
                .collect();
            self.ops
                .decode(&descs, &mut rows, params, &mut scratch.device)
                .context("prefill attention on the device")?;
            outs.push(
                self.ops
                    .finish_batch(&mut rows, &[], &[], out_dtype)
                    .context("collecting a prompt's output on the device")?,
            );
        }
        // Padding queries past `new_len` (a shorter row of the batch) stay zero.
        let (l, n_q, d) = q.dims3()?;
        if new_len < l {
            outs.push(Tensor::zeros((l - new_len, n_q, d), out_dtype, q.device())?);
        }
        let out = Tensor::cat(&outs, 0)?;
        prompt.out[row] = Some(out.transpose(0, 1)?);
        Ok(true)
    }

    /// The loaded prompt batch's output `(B, Hq, L, D)` in `dtype` on the device, from the rows
    /// the device attended and, for any other, the host's.
    pub(super) fn take_prompt_output(
        &self,
        batch: &mut OffloadBatch<O::Batch, O::Staged>,
        dtype: DType,
    ) -> anyhow::Result<Tensor> {
        let OffloadBatch { call, host, .. } = batch;
        let Call::Prompt {
            device: Some(prompt),
        } = call
        else {
            anyhow::bail!("no prompt batch is loaded on the device")
        };
        let host_out = if prompt.out.iter().any(Option::is_none) {
            Some(self.cpu.take_output(host, dtype)?)
        } else {
            None
        };
        let mut rows = Vec::with_capacity(prompt.out.len());
        for (r, out) in prompt.out.iter_mut().enumerate() {
            rows.push(match (out.take(), &host_out) {
                (Some(t), _) => t.to_dtype(dtype)?,
                (None, Some(h)) => h.get(r)?.to_device(self.ops.device())?,
                (None, None) => anyhow::bail!("prompt row {r} has no output"),
            });
        }
        // The engine's tensors are not held past the call.
        *call = Call::Prompt { device: None };
        Ok(Tensor::stack(&rows, 0)?)
    }
}
