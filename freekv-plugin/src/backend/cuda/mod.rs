//! The CUDA implementation of FreeKV.
//!
//! - [`source`](crate::cuda::source) / [`nvrtc`](crate::cuda::nvrtc): our CUDA C kernels
//!   (`kernels/*.cu`) and their run-time compilation, cached per configuration and architecture
//!   (feature `nvrtc`, which CI uses without a GPU).
//! - The rest needs the CUDA driver (feature `cuda`): loaded modules per device
//!   ([`module`](crate::cuda::module)), typed kernel launches ([`kernels`](crate::cuda::kernels)),
//!   raw device buffers ([`mem`](crate::cuda::mem)), the pinned host tier
//!   ([`pinned`](crate::cuda::pinned)), the per-sequence device tier
//!   ([`device_tier`](crate::cuda::device_tier)) and the double-buffered streamed recall with its
//!   worker thread ([`recall`](crate::cuda::recall)).
//! - [`backend`](crate::cuda::backend): the [`Backend`](crate::backend::Backend) implementation
//!   tying these together ([`CudaBackend`](crate::cuda::backend::CudaBackend)), with its storage
//!   types ([`tier`](crate::cuda::tier)) and device work ([`ops`](crate::cuda::ops)).

// `CUstream` is a raw-pointer typedef: clippy takes every function that receives one for a
// pointer dereference. We only hand these opaque handles back to the driver, which validates them.
#![allow(clippy::not_unsafe_ptr_arg_deref)]

pub mod nvrtc;
pub mod source;

#[cfg(feature = "cuda")]
pub mod backend;
#[cfg(feature = "cuda")]
pub mod device_tier;
#[cfg(feature = "cuda")]
pub mod kernels;
#[cfg(feature = "cuda")]
pub mod mem;
#[cfg(feature = "cuda")]
pub mod module;
#[cfg(feature = "cuda")]
pub mod ops;
#[cfg(feature = "cuda")]
pub mod pinned;
#[cfg(feature = "cuda")]
pub mod recall;
#[cfg(feature = "cuda")]
pub mod tier;
