//! [`Backend`](crate::backend::Backend) on a CUDA device.
//!
//! Division of labour (the CPU backend is the reference, and is reused wherever the data lives on
//! the host, so its decisions are made by the very same code):
//! - host tier: the CPU host tier (pages HND by block id, summaries); tokens are written and pages
//!   summarised on the host, exactly as on CPU;
//! - working set: slot tables, plans and the stored query on the host (table-only CPU tier);
//!   the slot data in device memory ([`CudaDeviceTier`](super::tier::CudaDeviceTier)), always copied (the GPU design: attention
//!   reads the device tier, whatever `device_tier` says);
//! - selection (scores, pooling, top-k, replacement plan) and the correction's similarity: on the
//!   host, by the CPU backend (identical plans on both backends);
//! - recall and working-set resets: chunks through the double-buffered [`RecallPipeline`]
//!   (copy engines into staging, `freekv_recall_scatter` into the slots);
//! - decode attention over the working set: `freekv_decode_partial` + `freekv_decode_combine`;
//! - dense decode (no working set), sliding-window layers (the decode kernel has no position mask)
//!   and prefill attention: on the host over the host tier, by the CPU backend.
//!
//! A device failure fails the operation with an error naming it (the request it serves fails;
//! the instance and the server carry on).

use std::sync::Arc;

use candle_core::Device;
use cudarc::driver::{sys, CudaContext, CudaStream};

use crate::backend::cpu::elem::KvElem;
use crate::backend::cpu::CpuBackend;
use crate::geometry::Geometry;
use crate::{AttnParams, FreeKvConfig, KvDType};

use super::kernels::Kernels;
use super::module;
use super::recall::RecallPipeline;
use super::source::{KernelConfig, KernelDtype};

mod imp;

/// Most chunks per staging buffer of the recall pipeline.
const MAX_CHUNKS_PER_BUFFER: usize = 256;

/// The CUDA backend for KV stored as `T` (`f16` or `bf16`).
pub struct CudaBackend<T: KvElem> {
    cpu: CpuBackend<T>,
    geo: Geometry,
    device: Device,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    kernels: Arc<Kernels>,
    pipeline: RecallPipeline,
    sm_count: usize,
}

impl<T: KvElem> CudaBackend<T> {
    /// A backend for `geo` on `device` (a candle CUDA device): compiles and loads the kernels for
    /// this configuration and starts the recall pipeline. Errors name what is unsupported
    /// (f32 KV, head dims other than 64/128/256, page sizes other than 8/16/32).
    pub fn new(geo: Geometry, config: &FreeKvConfig, device: &Device) -> anyhow::Result<Self> {
        let Device::Cuda(cuda) = device else {
            anyhow::bail!(
                "the FreeKV CUDA backend needs a CUDA device, got {:?}",
                device.location()
            );
        };
        let dtype = match T::DTYPE {
            KvDType::F16 => KernelDtype::F16,
            KvDType::BF16 => KernelDtype::Bf16,
            KvDType::F32 => anyhow::bail!(
                "the FreeKV CUDA kernels store KV as f16 or bf16; f32 KV runs on the CPU backend"
            ),
        };
        let kcfg = KernelConfig {
            dtype,
            head_dim: geo.head_dim,
            page_size: geo.page_size,
            group: geo.group,
        };
        kcfg.validate().map_err(|e| {
            anyhow::anyhow!("the FreeKV CUDA kernels do not support this model: {e}")
        })?;
        let ctx = cuda.cuda_stream().context().clone();
        ctx.bind_to_thread()?;
        let kernels = Arc::new(Kernels::new(module::load(&ctx, kcfg)?));
        let stream = ctx.new_stream()?;
        let chunk_bytes = 2 * geo.page_size * geo.head_dim * 2;
        let per_buffer = (geo.num_kv_heads * geo.slots).clamp(1, MAX_CHUNKS_PER_BUFFER);
        let pipeline = RecallPipeline::new(
            &ctx,
            kernels.clone(),
            chunk_bytes,
            per_buffer,
            geo.num_kv_heads,
        )?;
        let sm_count = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?
            .max(1) as usize;
        // The CPU backend serves the host-side operations with table-only working sets.
        let cpu_config = FreeKvConfig {
            device_tier: crate::DeviceTierLayout::InPlace,
            ..config.clone()
        };
        Ok(Self {
            cpu: CpuBackend::new(geo, &cpu_config),
            geo,
            device: device.clone(),
            ctx,
            stream,
            kernels,
            pipeline,
            sm_count,
        })
    }

    fn bind(&self) -> anyhow::Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| anyhow::anyhow!("binding the CUDA context to this thread: {e}"))
    }

    /// Bytes of one chunk (one head's K+V of one page) as the CPU copy tier counts them.
    fn chunk_bytes(&self) -> usize {
        2 * self.geo.page_size * self.geo.head_dim * std::mem::size_of::<T>()
    }

    /// Whether decode over a working set can run on the device with these parameters.
    fn decode_on_device(params: &AttnParams) -> bool {
        params.sliding_window.is_none() && params.softcap.is_none_or(|c| c > 0.0)
    }
}
