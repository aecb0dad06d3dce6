//! FreeKV for mistral.rs.

/// The CUDA backend: kernels compiled with NVRTC (feature `nvrtc`), device code (feature `cuda`).
#[cfg(feature = "nvrtc")]
#[path = "backend/cuda/mod.rs"]
pub mod cuda;
