//! FreeKV for mistral.rs: KV-cache retrieval with speculative selection, head-wise
//! correction and hybrid layouts (Liu et al., arXiv 2505.13109), as a paged-attention backend.
//!
//! Map of the crate:
//! - [`config`]: the knobs, declared once ([`FreeKvConfig`] and its [`FreeKvConfig::KNOBS`]
//!   table of flags, `FREEKV_*` variables and help), their parsers and validation;
//! - [`FreeKv`] (here): the instance the engine glue calls, one per loaded model;
//! - `timeline` / `prefill`: the method itself, one decode step of one layer as the spec reads
//!   (plan -> append -> correct? -> attend -> schedule) and the prompt path;
//! - `step_plan`: a decode step's plan for the whole batch, built and checked once;
//! - `backend`: the FreeKV operations behind two traits (`Memory`: allocation and sizes;
//!   `Backend`: batch-level operations), implemented by `backend::cpu` (working set read in
//!   place) and `backend::offload` (working set in a device's own memory, over a `DeviceOps`:
//!   host memory, or `cuda::ops::CudaOps` from `cuda` (features `nvrtc`/`cuda`: the CUDA
//!   kernels and device code), which [`FreeKv::new_on`] uses with a CUDA device); private:
//!   the crate's API is [`FreeKv`] and its types;
//! - `geometry`: page arithmetic (sink / window / candidates / slots);
//! - `plan`: a working set's slot tables as plain arrays (slot tables, pending
//!   replacements, stored query), the one slot layout every backend's working set is built on;
//! - `correction`: the correction test's thresholds, fixed or adapting to a target rate;
//! - `state`: what is kept per layer and per (sequence, layer), the sequence's phase;
//! - [`counters`]: what FreeKV did, per layer and in total;
//! - `engine` / `cli` (features `engine` / `cli`): the mistral.rs glue and CLI flags.

#![warn(missing_docs)]

mod backend;
mod background;
pub mod config;
mod correction;
pub mod counters;
mod geometry;
mod instance;
mod math;
mod plan;
mod prefill;
pub mod probe;
mod state;
mod step_plan;
mod timeline;
mod types;

/// The CUDA backend: kernels compiled with NVRTC (feature `nvrtc`), device code (feature `cuda`).
#[cfg(feature = "nvrtc")]
#[path = "backend/cuda/mod.rs"]
pub mod cuda;

/// The engine glue (mistral.rs paged-attention backend).
#[cfg(feature = "engine")]
pub mod engine;

/// `--freekv-*` flags for the engine's CLI.
#[cfg(feature = "cli")]
pub mod cli;

use half::{bf16, f16};

pub use config::{
    ConfigError, DeviceTierLayout, FreeKvConfig, Mode, Policy, Pooling, PrefillAttention, Selector,
    SummaryKind,
};
pub use counters::{Counters, LayerCounters};
pub use math::CpuKernels;
pub use state::StepTrace;
pub use types::{AttnParams, DecodeRow, KvDType, ModelShape, PrefillRow, Qkv};

use backend::cpu::elem::KvElem;
use backend::cpu::CpuBackend;
use backend::offload::emulated::EmulatedDevice;
use backend::offload::OffloadBackend;
use backend::Backend;
use geometry::Geometry;
pub use instance::AnyInstance;
use instance::Instance;

/// FreeKV for one loaded model: the host tier of every layer, every sequence's per-layer
/// state, and background worker threads (knob `workers`) for the speculative selections.
///
/// `Send + Sync`; every method takes `&self` (one lock per layer inside). Calls for one layer
/// must come in the model's order (the engine's forward pass); a decode call for layer `l`
/// waits for the background work that layer `l`'s previous call scheduled.
pub struct FreeKv {
    config: FreeKvConfig,
    shape: ModelShape,
    inner: Box<dyn AnyInstance>,
}

/// One backend's instance behind the object-safe [`AnyInstance`] face.
fn instance<B: Backend>(
    backend: B,
    config: &FreeKvConfig,
    shape: &ModelShape,
    num_blocks: usize,
    dtype_name: &str,
) -> anyhow::Result<Box<dyn AnyInstance>> {
    Ok(Box::new(Instance::new(
        backend,
        config.clone(),
        shape,
        num_blocks,
        dtype_name,
    )?))
}

/// The offload design on host memory (the copy layout).
fn host_offload<T: KvElem>(
    geo: Geometry,
    config: &FreeKvConfig,
) -> OffloadBackend<T, EmulatedDevice<T>> {
    OffloadBackend::new(geo, config, EmulatedDevice::new(geo))
}

impl FreeKv {
    /// Validates `config` for `shape` and allocates the host tier: `num_blocks` pages (engine
    /// blocks) per layer, zeroed and committed lazily. An allocation the system refuses is an
    /// error naming the bytes and the engine knobs that lower it.
    pub fn new(
        config: FreeKvConfig,
        shape: ModelShape,
        num_blocks: usize,
        dtype: KvDType,
    ) -> anyhow::Result<Self> {
        config.validate(Some(&shape))?;
        let geo = Geometry::new(&config, &shape);
        let (c, s, n) = (&config, &shape, num_blocks);
        let inner = match (dtype, config.device_tier) {
            (KvDType::F32, DeviceTierLayout::InPlace) => {
                instance(CpuBackend::<f32>::new(geo, c), c, s, n, "f32")?
            }
            (KvDType::F16, DeviceTierLayout::InPlace) => {
                instance(CpuBackend::<f16>::new(geo, c), c, s, n, "f16")?
            }
            (KvDType::BF16, DeviceTierLayout::InPlace) => {
                instance(CpuBackend::<bf16>::new(geo, c), c, s, n, "bf16")?
            }
            (KvDType::F32, DeviceTierLayout::Copy) => {
                instance(host_offload::<f32>(geo, c), c, s, n, "f32")?
            }
            (KvDType::F16, DeviceTierLayout::Copy) => {
                instance(host_offload::<f16>(geo, c), c, s, n, "f16")?
            }
            (KvDType::BF16, DeviceTierLayout::Copy) => {
                instance(host_offload::<bf16>(geo, c), c, s, n, "bf16")?
            }
        };
        Ok(Self {
            config,
            shape,
            inner,
        })
    }

    /// Like [`FreeKv::new`], with the device that runs FreeKV chosen by `device`: the CPU is
    /// [`FreeKv::new`] itself; a CUDA device (feature `cuda`) runs the CUDA backend (working sets
    /// in device memory, recall through the copy engines, decode attention with the FreeKV
    /// kernels; f16 or bf16 KV only). q/k/v may then live on that device, and outputs are
    /// returned on it. Any other device is an error naming it.
    pub fn new_on(
        device: &candle_core::Device,
        config: FreeKvConfig,
        shape: ModelShape,
        num_blocks: usize,
        dtype: KvDType,
    ) -> anyhow::Result<Self> {
        match device {
            candle_core::Device::Cpu => Self::new(config, shape, num_blocks, dtype),
            #[cfg(feature = "cuda")]
            candle_core::Device::Cuda(_) => {
                Self::new_cuda(device, config, shape, num_blocks, dtype)
            }
            other => anyhow::bail!(
                "FreeKV has no backend for {:?} (the CUDA backend needs the `cuda` feature)",
                other.location()
            ),
        }
    }

    /// [`FreeKv::new_on`] for a CUDA device.
    #[cfg(feature = "cuda")]
    fn new_cuda(
        device: &candle_core::Device,
        config: FreeKvConfig,
        shape: ModelShape,
        num_blocks: usize,
        dtype: KvDType,
    ) -> anyhow::Result<Self> {
        use cuda::ops::CudaOps;
        config.validate(Some(&shape))?;
        let geo = Geometry::new(&config, &shape);
        let inner = match dtype {
            KvDType::F16 => {
                let backend = OffloadBackend::new(geo, &config, CudaOps::<f16>::new(geo, device)?);
                instance(backend, &config, &shape, num_blocks, "f16")?
            }
            KvDType::BF16 => {
                let backend = OffloadBackend::new(geo, &config, CudaOps::<bf16>::new(geo, device)?);
                instance(backend, &config, &shape, num_blocks, "bf16")?
            }
            KvDType::F32 => anyhow::bail!(
                "the FreeKV CUDA backend stores KV as f16 or bf16, not f32: load the model with \
                 --dtype bf16 or f16, or run it on the CPU"
            ),
        };
        Ok(Self {
            config,
            shape,
            inner,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &FreeKvConfig {
        &self.config
    }

    /// The model shape.
    pub fn shape(&self) -> &ModelShape {
        &self.shape
    }
}

impl std::ops::Deref for FreeKv {
    type Target = dyn AnyInstance;

    /// FreeKV's operations ([`AnyInstance`]) are called on the instance directly:
    /// `freekv.decode(...)`.
    fn deref(&self) -> &Self::Target {
        &*self.inner
    }
}
