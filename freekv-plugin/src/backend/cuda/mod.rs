//! The CUDA implementation of FreeKV.
//!
//! - [`source`] / [`nvrtc`]: our CUDA C kernels (`kernels/*.cu`) and their run-time compilation,
//!   cached per configuration and architecture (feature `nvrtc`, which CI uses without a GPU).
//! - The rest needs the CUDA driver (feature `cuda`): loaded modules per device ([`module`]),
//!   typed kernel launches ([`kernels`]), raw device buffers ([`mem`]), the pinned host tier
//!   ([`pinned`]), the per-sequence device tier ([`device_tier`]) and the double-buffered streamed
//!   recall with its worker thread ([`recall`]).

pub mod nvrtc;
pub mod source;

#[cfg(feature = "cuda")]
pub mod device_tier;
#[cfg(feature = "cuda")]
pub mod kernels;
#[cfg(feature = "cuda")]
pub mod mem;
#[cfg(feature = "cuda")]
pub mod module;
#[cfg(feature = "cuda")]
pub mod pinned;
#[cfg(feature = "cuda")]
pub mod recall;
