//! Can FreeKV serve this model? Checked once, at load, with an error that names the reason.

use mistralrs_core::attention_backend::{KvCacheLayout, ModelConfigLike, PagedCacheType};

use crate::ModelShape;

/// The attention geometry FreeKV needs, or why the model cannot be served.
pub(crate) fn model_shape(
    model: &dyn ModelConfigLike,
    cache_type: PagedCacheType,
) -> anyhow::Result<ModelShape> {
    if let KvCacheLayout::Mla { kv_lora_rank, .. } = model.kv_cache_layout() {
        anyhow::bail!(
            "FreeKV cannot serve this model: it uses multi-head latent attention (MLA, KV rank \
             {kv_lora_rank}; DeepSeek-V2/V3, GLM-4-MoE-Lite), whose compressed KV cache has no \
             per-head keys to summarise. Run it with --paged-attn off."
        );
    }
    if cache_type != PagedCacheType::Auto {
        anyhow::bail!(
            "FreeKV stores KV in the model's dtype; --pa-cache-type {cache_type:?} is not supported \
             (use --pa-cache-type auto)"
        );
    }
    let layers = model.num_layers();
    let (kv_heads, k_dim, v_dim) = (model.num_kv_heads(), model.k_head_dim(), model.v_head_dim());
    if k_dim != v_dim {
        anyhow::bail!(
            "FreeKV cannot serve this model: key head dim {k_dim} differs from value head dim {v_dim}"
        );
    }
    for layer in 0..layers {
        if !model.uses_own_kv_cache_for_layer(layer) {
            anyhow::bail!(
                "FreeKV cannot serve this model: layer {layer} reads another layer's KV cache \
                 (shared-KV layers); run it with --paged-attn off"
            );
        }
        let (h, kd, vd) = (
            model.num_kv_heads_for_layer(layer),
            model.k_head_dim_for_layer(layer),
            model.v_head_dim_for_layer(layer),
        );
        if (h, kd, vd) != (kv_heads, k_dim, v_dim) {
            anyhow::bail!(
                "FreeKV cannot serve this model: layer {layer} has {h} KV heads of dim {kd}/{vd}, \
                 other layers {kv_heads} of dim {k_dim}; FreeKV needs one geometry for all layers"
            );
        }
    }
    let q_heads = model.num_attn_heads();
    if kv_heads == 0 || !q_heads.is_multiple_of(kv_heads) {
        anyhow::bail!(
            "FreeKV cannot serve this model: {q_heads} query heads are not a multiple of {kv_heads} KV heads"
        );
    }
    Ok(ModelShape {
        num_layers: layers,
        num_q_heads: q_heads,
        num_kv_heads: kv_heads,
        head_dim: k_dim,
    })
}

/// FreeKV keeps one instance per model on one device: a model whose layers are mapped
/// across several devices (a device map, tensor parallelism) is refused, naming them.
pub(crate) fn one_device(
    device: &candle_core::Device,
    layer_devices: &[Option<candle_core::Device>],
) -> anyhow::Result<()> {
    let mut others: Vec<String> = layer_devices
        .iter()
        .flatten()
        .filter(|d| !d.same_device(device))
        .map(|d| format!("{:?}", d.location()))
        .collect();
    others.dedup();
    if !others.is_empty() {
        anyhow::bail!(
            "FreeKV serves a model on one device, but this model's layers are mapped to {:?} and \
             {}; load it on one device (drop the device map / --num-device-layers) or run it \
             with --paged-attn off",
            device.location(),
            others.join(", ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_on_the_model_device_are_one_device() {
        let cpu = candle_core::Device::Cpu;
        assert!(one_device(&cpu, &[]).is_ok());
        assert!(one_device(&cpu, &[None, Some(cpu.clone()), None]).is_ok());
    }

    struct Fake {
        layout: KvCacheLayout,
        q_heads: usize,
        kv_heads: usize,
        k_dim: usize,
        v_dim: usize,
        odd_layer: Option<usize>,
    }

    impl ModelConfigLike for Fake {
        fn max_seq_len(&self) -> usize {
            4096
        }
        fn num_layers(&self) -> usize {
            4
        }
        fn hidden_size(&self) -> usize {
            self.q_heads * self.k_dim
        }
        fn num_kv_heads(&self) -> usize {
            self.kv_heads
        }
        fn num_attn_heads(&self) -> usize {
            self.q_heads
        }
        fn k_head_dim(&self) -> usize {
            self.k_dim
        }
        fn v_head_dim(&self) -> usize {
            self.v_dim
        }
        fn num_kv_heads_for_layer(&self, layer: usize) -> usize {
            if Some(layer) == self.odd_layer {
                self.kv_heads * 2
            } else {
                self.kv_heads
            }
        }
        fn kv_cache_layout(&self) -> KvCacheLayout {
            self.layout
        }
    }

    fn llama_like() -> Fake {
        Fake {
            layout: KvCacheLayout::Standard,
            q_heads: 32,
            kv_heads: 8,
            k_dim: 128,
            v_dim: 128,
            odd_layer: None,
        }
    }

    fn error(f: &Fake, cache: PagedCacheType) -> String {
        format!("{:#}", model_shape(f, cache).unwrap_err())
    }

    #[test]
    fn a_standard_gqa_model_is_served() {
        let s = model_shape(&llama_like(), PagedCacheType::Auto).unwrap();
        assert_eq!(
            (s.num_layers, s.num_q_heads, s.num_kv_heads, s.head_dim),
            (4, 32, 8, 128)
        );
    }

    #[test]
    fn unservable_models_are_refused_with_the_reason() {
        let mla = Fake {
            layout: KvCacheLayout::Mla {
                kv_lora_rank: 512,
                kpe_head_dim: 64,
            },
            ..llama_like()
        };
        assert!(error(&mla, PagedCacheType::Auto).contains("multi-head latent attention"));
        let dims = Fake {
            v_dim: 64,
            ..llama_like()
        };
        assert!(error(&dims, PagedCacheType::Auto).contains("value head dim 64"));
        let mixed = Fake {
            odd_layer: Some(2),
            ..llama_like()
        };
        assert!(error(&mixed, PagedCacheType::Auto).contains("layer 2 has 16 KV heads"));
        let groups = Fake {
            q_heads: 30,
            ..llama_like()
        };
        assert!(error(&groups, PagedCacheType::Auto).contains("30 query heads"));
        assert!(error(&llama_like(), PagedCacheType::F8E4M3).contains("--pa-cache-type"));
    }
}
