//! The CUDA implementation of FreeKV.
//!
//! - [`source`](crate::cuda::source) / [`nvrtc`](crate::cuda::nvrtc): our CUDA C kernels
//!   (`kernels/*.cu`) and their run-time compilation, cached per configuration and architecture
//!   (feature `nvrtc`, which CI uses without a GPU).
//! - The rest needs the CUDA driver (feature `cuda`): loaded modules per device
//!   ([`module`](crate::cuda::module)), typed kernel launches ([`kernels`](crate::cuda::kernels)),
//!   raw device buffers and host-memory registration ([`mem`](crate::cuda::mem)), a decode
//!   step's tensors read in place and its output ([`batch`](crate::cuda::batch)), the
//!   per-(sequence, layer) device memory
//!   ([`device_tier`](crate::cuda::device_tier)), the correction test against each sequence's
//!   stored query ([`drift`](crate::cuda::drift)), the per-layer page summaries and scoring
//!   buffers ([`scoring`](crate::cuda::scoring)) and the double-buffered streamed recall with
//!   its worker thread ([`recall`](crate::cuda::recall)).
//! - [`ops`](crate::cuda::ops): [`CudaOps`](crate::cuda::ops::CudaOps), the
//!   [`DeviceOps`](crate::backend::offload::DeviceOps) of a CUDA device; the backend the engine
//!   runs is [`OffloadBackend`](crate::backend::offload::OffloadBackend) over it.

// `CUstream` is a raw-pointer typedef: clippy takes every function that receives one for a
// pointer dereference. We only hand these opaque handles back to the driver, which validates them.
#![allow(clippy::not_unsafe_ptr_arg_deref)]

pub mod nvrtc;
pub mod source;

#[cfg(feature = "cuda")]
pub mod batch;
#[cfg(feature = "cuda")]
pub mod device_tier;
#[cfg(feature = "cuda")]
pub mod drift;
#[cfg(feature = "cuda")]
pub mod kernels;
#[cfg(feature = "cuda")]
pub mod mem;
#[cfg(feature = "cuda")]
pub mod module;
#[cfg(feature = "cuda")]
pub mod ops;
#[cfg(feature = "cuda")]
pub mod recall;
#[cfg(feature = "cuda")]
pub mod scoring;
