//! One attention layer's forward pass, served by FreeKV.

use candle_core::{Result, Tensor};
use mistralrs_core::attention_backend::{
    FlashParams, PagedAttentionInputMetadata, PagedAttentionLayerBackend, Sdpa, SdpaParams,
};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use candle_core::TensorId;

use super::registry::Registry;
use super::step_rows::{self, StepRows};
use crate::{AttnParams, FreeKv, PrefillAttention, PrefillRow, Qkv};

/// A model layer's paged attention. The layer does not know its index at construction
/// (the engine builds layers before the cache); its first call finds it from its cache
/// handle in its backend's registry, and from then on it keeps its model's instance alive
/// (see `registry`) and needs no lookup.
pub struct FreeKvLayer {
    models: Arc<Registry>,
    adopted: OnceLock<Adopted>,
    /// The engine's KV-cache manager has been tied to the model.
    manager_bound: AtomicBool,
}

/// What a layer learned at its first call: which cache, model and layer it serves.
struct Adopted {
    handle: TensorId,
    index: usize,
    freekv: Arc<FreeKv>,
    layer: usize,
}

impl FreeKvLayer {
    /// A layer of a model served by the backend whose registry is `models`.
    pub(crate) fn new(models: Arc<Registry>) -> Self {
        Self {
            models,
            adopted: OnceLock::new(),
            manager_bound: AtomicBool::new(false),
        }
    }
}

fn engine_err(e: anyhow::Error) -> candle_core::Error {
    candle_core::Error::Msg(format!("FreeKV: {e:#}"))
}

/// Whether the engine's own attention computes a prompt batch's output (FreeKV then only
/// writes its pages and makes the first selection): as `--freekv-prefill-attention` says
/// (`auto`: on a GPU), for a batch the engine's causal `mask` covers exactly, as its stock
/// paged attention runs it: no cached prefix, no padding, full attention.
fn engine_attends_prompt(
    choice: PrefillAttention,
    on_cpu: bool,
    has_mask: bool,
    params: &AttnParams,
    rows: &[PrefillRow<'_>],
    q_len: usize,
) -> bool {
    let wanted = match choice {
        PrefillAttention::Auto => !on_cpu,
        PrefillAttention::Engine => true,
        PrefillAttention::FreeKv => false,
    };
    wanted
        && has_mask
        && params.sliding_window.is_none()
        && rows.iter().all(|r| r.cached_len == 0 && r.new_len == q_len)
}

impl PagedAttentionLayerBackend for FreeKvLayer {
    fn forward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Option<&Tensor>,
        key_cache: Option<Tensor>,
        _value_cache: Option<Tensor>,
        meta: &PagedAttentionInputMetadata,
        sdpa: &SdpaParams,
        flash: Option<&FlashParams>,
    ) -> Result<Tensor> {
        // Calibration (imatrix) forwards carry no cache: plain prefill attention, nothing kept.
        let Some(key_cache) = key_cache else {
            return Sdpa.run_attention(q, k, v, mask, flash, sdpa);
        };
        if sdpa.sinks.is_some() {
            candle_core::bail!(
                "FreeKV: this model uses attention-sink logits (e.g. GPT-OSS), which FreeKV does not support; run it with --paged-attn off"
            );
        }
        let handle = key_cache.id();
        let looked_up;
        let served = match self.adopted.get().filter(|a| a.handle == handle) {
            Some(a) => a,
            None => {
                let (index, freekv, layer) = self.models.adopt(handle).ok_or_else(|| {
                    candle_core::Error::Msg(
                        "FreeKV: a forward call came with a KV cache FreeKV did not allocate"
                            .into(),
                    )
                })?;
                let fresh = Adopted {
                    handle,
                    index,
                    freekv,
                    layer,
                };
                // A cache other than the adopted one (not seen from the engine) is served
                // through the registry on every call.
                match self.adopted.set(fresh) {
                    Ok(()) => self.adopted.get().expect("just set"),
                    Err(other) => {
                        self.manager_bound.store(false, Ordering::Relaxed);
                        looked_up = other;
                        &looked_up
                    }
                }
            }
        };
        let step = step_rows::prepared(meta).map_err(engine_err)?;
        if !self.manager_bound.swap(true, Ordering::Relaxed) {
            self.models
                .bind_manager(step.kv_cache_manager_id, served.index);
        }
        let (freekv, layer) = (&*served.freekv, served.layer);
        let page_size = freekv.config().page_size;
        let params = AttnParams {
            softmax_scale: sdpa.softmax_scale,
            softcap: sdpa.softcap,
            sliding_window: sdpa.sliding_window,
        };
        let (batch, q_heads, q_len, head_dim) = q.dims4()?;
        match step.rows().map_err(engine_err)? {
            StepRows::Prompt { rows, max_len } => {
                if rows.len() != batch || *max_len != q_len {
                    candle_core::bail!(
                        "FreeKV: the step's metadata describes {} prompt rows of {max_len} tokens, \
                         the layer received {batch} rows of {q_len}",
                        rows.len()
                    );
                }
                if layer == 0 {
                    tracing::debug!("FreeKV prefill rows (L={q_len}): {rows:?}");
                }
                let rows = rows
                    .iter()
                    .map(|r| r.as_row(page_size))
                    .collect::<anyhow::Result<Vec<_>>>()
                    .map_err(engine_err)?;
                let choice = freekv.config().prefill_attention;
                let on_cpu = q.device().is_cpu();
                if engine_attends_prompt(choice, on_cpu, mask.is_some(), &params, &rows, q_len) {
                    freekv
                        .prefill(layer, &rows, Qkv::new(q, k, v), &params, false)
                        .map_err(engine_err)?;
                    return Sdpa.run_attention(q, k, v, mask, flash, sdpa);
                }
                // Otherwise FreeKV's own causal kernel attends the prompt, over the cached
                // prefix (if any) and the new tokens, straight from the host tier: the engine's
                // mask is not read (the kernel masks by position, window and softcap from
                // `sdpa`).
                freekv
                    .prefill(layer, &rows, Qkv::new(q, k, v), &params, true)
                    .map_err(engine_err)?
                    .ok_or_else(|| {
                        candle_core::Error::Msg("FreeKV: prefill returned no output".into())
                    })
            }
            StepRows::Decode(rows) => {
                if q_len != 1 {
                    candle_core::bail!(
                        "FreeKV: decode steps of {q_len} tokens per sequence are not supported (speculative decoding); run with --paged-attn off"
                    );
                }
                if rows.len() != batch {
                    candle_core::bail!(
                        "FreeKV: the step's metadata describes {} decode rows, the layer received {batch}",
                        rows.len()
                    );
                }
                if layer == 0 {
                    tracing::trace!("FreeKV decode rows: {rows:?}");
                }
                let rows = rows
                    .iter()
                    .map(|r| r.as_row(page_size))
                    .collect::<anyhow::Result<Vec<_>>>()
                    .map_err(engine_err)?;
                let kv_heads = k.dim(1)?;
                let q = q.reshape((batch, q_heads, head_dim))?;
                let k = k.reshape((batch, kv_heads, head_dim))?;
                let v = v.reshape((batch, kv_heads, head_dim))?;
                freekv
                    .decode(layer, &rows, Qkv::new(&q, &k, &v), &params)
                    .map_err(engine_err)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_engine_attends_only_prompts_its_mask_covers() {
        let table = [0u32, 1];
        let row = |cached_len, new_len| PrefillRow {
            seq_id: 1,
            block_table: &table,
            cached_len,
            new_len,
        };
        let full = AttnParams::scaled(1.0);
        let window = AttnParams {
            sliding_window: Some(8),
            ..full
        };
        let fresh = [row(0, 40), row(0, 40)];
        use PrefillAttention::{Auto, Engine, FreeKv};
        assert!(engine_attends_prompt(Auto, false, true, &full, &fresh, 40));
        assert!(!engine_attends_prompt(Auto, true, true, &full, &fresh, 40));
        assert!(engine_attends_prompt(Engine, true, true, &full, &fresh, 40));
        assert!(!engine_attends_prompt(
            FreeKv, false, true, &full, &fresh, 40
        ));
        // No mask (a one-token prompt), a sliding window, a cached prefix, padding.
        assert!(!engine_attends_prompt(
            Engine, false, false, &full, &fresh, 40
        ));
        assert!(!engine_attends_prompt(
            Engine, false, true, &window, &fresh, 40
        ));
        let cached = [row(0, 40), row(32, 40)];
        assert!(!engine_attends_prompt(
            Engine, false, true, &full, &cached, 40
        ));
        let padded = [row(0, 40), row(0, 30)];
        assert!(!engine_attends_prompt(
            Engine, false, true, &full, &padded, 40
        ));
    }
}
