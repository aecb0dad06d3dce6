//! [`FreeKvBackend`]: the object registered with the engine.

use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Result, Tensor};
use mistralrs_core::attention_backend::{
    paged_attention_backend, register_paged_attention_backend, BackendStep, CacheConfig,
    ModelConfigLike, PagedAttentionBackend, PagedAttentionInputMetadata,
    PagedAttentionLayerBackend, PagedCacheType, SchedulerStats,
};
use once_cell::sync::OnceCell;

use super::rank::Rank;
use super::registry::{LoadedModel, Registry};
use super::{layer::FreeKvLayer, metrics, model_check, step_rows};
use crate::backend::offload::ops::STAGED_CHUNKS_PER_BUFFER;
use crate::{FreeKv, FreeKvConfig, KvDType};

/// The FreeKV paged-attention backend. One per process (the engine registers one backend);
/// the configuration it holds applies to the models loaded after it was set, and it keeps
/// the models it serves.
pub struct FreeKvBackend {
    config: Mutex<FreeKvConfig>,
    models: Arc<Registry>,
    /// This process's tensor-parallel rank (each rank registers its own backend), read at
    /// first use: after a model loaded, so the engine has already checked its configuration.
    rank: OnceCell<Rank>,
}

/// The backend registered with the engine (set once; the engine holds it too).
static BACKEND: OnceCell<Arc<FreeKvBackend>> = OnceCell::new();

/// Validates `config`, registers the FreeKV backend with the engine (once per process) and
/// makes `config` the configuration of the models loaded from now on.
pub fn register(config: FreeKvConfig) -> anyhow::Result<()> {
    config.validate(None)?;
    let backend = BACKEND.get_or_try_init(|| -> anyhow::Result<_> {
        let backend = Arc::new(FreeKvBackend {
            config: Mutex::new(config.clone()),
            models: Arc::default(),
            rank: OnceCell::new(),
        });
        if register_paged_attention_backend(backend.clone()).is_err() {
            let other = paged_attention_backend().map_or("?", |b| b.name());
            anyhow::bail!("another paged-attention backend (`{other}`) is already registered");
        }
        Ok(backend)
    })?;
    *backend.config.lock().unwrap_or_else(|e| e.into_inner()) = config;
    Ok(())
}

/// [`register`] with the configuration from the `FREEKV_*` environment variables.
pub fn register_from_env() -> anyhow::Result<()> {
    register(FreeKvConfig::from_env()?)
}

/// Changes the configuration for models loaded from now on (the backend must be registered).
pub fn configure(config: FreeKvConfig) -> anyhow::Result<()> {
    anyhow::ensure!(
        BACKEND.get().is_some(),
        "FreeKV is not registered; call freekv_plugin::engine::register first"
    );
    register(config)
}

/// Every model served by FreeKV in this process that is still loaded, in load order (none
/// before [`register`]).
pub fn loaded_models() -> Vec<LoadedModel> {
    BACKEND.get().map(|b| b.models.loaded()).unwrap_or_default()
}

impl FreeKvBackend {
    fn rank(&self) -> Rank {
        *self.rank.get_or_init(Rank::of_this_process)
    }

    fn config(&self) -> FreeKvConfig {
        self.config
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

fn kv_dtype(dtype: DType) -> Result<KvDType> {
    Ok(match dtype {
        DType::F32 => KvDType::F32,
        DType::F16 => KvDType::F16,
        DType::BF16 => KvDType::BF16,
        other => candle_core::bail!("FreeKV stores KV as f32, f16 or bf16, not {other:?}"),
    })
}

impl PagedAttentionBackend for FreeKvBackend {
    fn name(&self) -> &str {
        "freekv"
    }

    /// The CPU, and CUDA devices when built with the `cuda` feature (the host tier then lives
    /// in host memory, the working sets on the device).
    fn supports_device(&self, device: &Device) -> bool {
        device.is_cpu() || (cfg!(feature = "cuda") && device.is_cuda())
    }

    fn block_size(
        &self,
        model: &dyn ModelConfigLike,
        cache_type: PagedCacheType,
        requested: Option<usize>,
    ) -> anyhow::Result<Option<usize>> {
        let config = self.config();
        let shape = model_check::model_shape(model, cache_type)?;
        config.validate(Some(&shape))?;
        let page_size = config.page_size;
        if let Some(block_size) = requested.filter(|&b| b != page_size) {
            anyhow::bail!(
                "--pa-block-size {block_size} differs from the FreeKV page size {page_size} \
                 (--freekv-page-size / FREEKV_PAGE_SIZE): a FreeKV page is one engine block, \
                 set them equal"
            );
        }
        Ok(Some(page_size))
    }

    /// FreeKV keeps per-sequence state and attends over rows of any length.
    fn mixed_length_batches(&self) -> bool {
        true
    }

    /// On a GPU the pool is FreeKV's host tier: the engine sizes it from host memory.
    fn pool_device(&self, device: &Device) -> Device {
        if device.is_cpu() {
            device.clone()
        } else {
            Device::Cpu
        }
    }

    /// On a GPU the device holds each sequence's working set (the budget per sparse layer and
    /// KV head, K and V), the pool's page summaries (upper and lower bound per block and KV
    /// head of each sparse layer, 1/16 of the keys at 32-token pages) and the dense layers'
    /// pages (the whole pool of each dense layer: 1/L of the host tier per dense layer), plus
    /// each sequence's stored query per sparse layer (the correction test's) and the recall
    /// pipeline's two staging buffers.
    fn device_kv_elements(
        &self,
        model: &dyn ModelConfigLike,
        cache_config: &CacheConfig,
        max_seqs: usize,
    ) -> Option<usize> {
        let config = self.config();
        let width = model.num_kv_heads() * model.k_head_dim();
        let layers = model.num_layers();
        let dense = (0..layers).filter(|&l| config.is_dense_layer(l)).count();
        let sparse = layers - dense;
        let blocks = cache_config.num_gpu_blocks;
        let working_sets = max_seqs * config.budget * width * 2 * sparse;
        let summaries = blocks * width * 2 * sparse;
        let dense_pages = blocks * cache_config.block_size * width * 2 * dense;
        let queries = max_seqs * model.num_attn_heads() * model.k_head_dim() * sparse;
        let chunk = 2 * cache_config.block_size * model.k_head_dim();
        let slots = config.budget / config.page_size;
        let staging = 2 * chunk * STAGED_CHUNKS_PER_BUFFER.min(model.num_kv_heads() * slots);
        let total = working_sets + summaries + dense_pages + queries + staging;
        // The engine reserves this much per layer: the total, spread over the layers.
        Some(total.div_ceil(layers.max(1)))
    }

    fn allocate_cache(
        &self,
        model: &dyn ModelConfigLike,
        cache_config: &CacheConfig,
        dtype: DType,
        device: &Device,
        layer_devices: &[Option<Device>],
    ) -> Result<Vec<(Tensor, Tensor)>> {
        let config = self.config();
        let shape = model_check::model_shape(model, cache_config.cache_type)
            .map_err(|e| candle_core::Error::Msg(format!("{e:#}")))?;
        model_check::one_device(device, layer_devices)
            .map_err(|e| candle_core::Error::Msg(format!("FreeKV: {e:#}")))?;
        let freekv = FreeKv::new_on(
            device,
            config,
            shape,
            cache_config.num_gpu_blocks,
            kv_dtype(dtype)?,
        )
        .map_err(|e| candle_core::Error::Msg(format!("FreeKV: {e:#}")))?;
        // One handle pair per layer: FreeKV owns the memory, the handles' ids name the layer.
        let mut caches = Vec::with_capacity(model.num_layers());
        for _ in 0..model.num_layers() {
            let k = Tensor::zeros(1, dtype, device)?;
            let v = Tensor::zeros(1, dtype, device)?;
            caches.push((k, v));
        }
        let handles: Vec<_> = caches.iter().map(|(k, _)| k.id()).collect();
        let model = Arc::new(freekv);
        let index = self.models.add_model(model.clone(), &handles);
        tracing::info!(
            "FreeKV serves model #{index} on {:?}: {} blocks of {} tokens, KV {dtype:?}, host tier {} MiB, device tier {} KiB per sequence and {} MiB for the pool (page summaries, dense layers' pages), CPU kernels {}, {:?}",
            device.location(),
            cache_config.num_gpu_blocks,
            cache_config.block_size,
            model.host_tier_bytes() >> 20,
            model.device_tier_bytes_per_sequence() >> 10,
            model.device_pool_bytes() >> 20,
            crate::CpuKernels::active().name(),
            model.config()
        );
        Ok(caches)
    }

    fn new_layer(
        &self,
        _head_dim: usize,
        _device: &Device,
        alibi_slopes: Option<Vec<f32>>,
    ) -> Result<Box<dyn PagedAttentionLayerBackend>> {
        if alibi_slopes.is_some() {
            candle_core::bail!(
                "FreeKV cannot serve this model: it uses ALiBi position biases, while FreeKV's page \
                 summaries assume rotary (or no) positions in the keys; run it with --paged-attn off"
            );
        }
        Ok(Box::new(FreeKvLayer::new(self.models.clone())))
    }

    fn on_sequence_freed(&self, kv_cache_manager_id: usize, seq_id: usize) {
        let Some(model) = self.models.model_for_manager(kv_cache_manager_id) else {
            return;
        };
        // The engine's sequence id is the `id` of the request's response (and of its chunks).
        // A preempted sequence is released too, and counts again from its new prefill.
        if let Some(c) = model.freekv.free_sequence(seq_id as u64) {
            tracing::info!(
                "FreeKV model #{}{} request {seq_id} released: {}",
                model.index,
                self.rank().label(),
                c.summary()
            );
        }
    }

    fn observe_scheduler(&self, kv_cache_manager_id: usize, stats: &SchedulerStats) {
        self.models.record_scheduler(kv_cache_manager_id, *stats);
    }

    fn metrics(&self) -> Option<String> {
        Some(metrics::render(&self.models.loaded(), self.rank()))
    }

    /// Reads the step's rows once, for every layer of the step.
    fn prepare_step(
        &self,
        metadata: &PagedAttentionInputMetadata,
        seq_ids: &[usize],
        kv_cache_manager_id: usize,
    ) -> Option<BackendStep> {
        Some(step_rows::prepare(metadata, seq_ids, kv_cache_manager_id))
    }
}
