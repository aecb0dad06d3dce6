//! The engine glue: FreeKV as mistral.rs's paged-attention backend.
//!
//! The patched engine (see `patches/`) calls a registered
//! [`PagedAttentionBackend`](mistralrs_core::attention_backend::PagedAttentionBackend) to size and
//! allocate the KV cache and to build each attention layer. This module translates the
//! engine's metadata into FreeKV's batch rows and back, and nothing else: the method itself
//! lives in the crate's core.
//!
//! Lifecycle:
//! 1. [`register`](crate::engine::register) (the CLI does it from `--freekv-*` flags, an SDK user calls it before
//!    building a model) validates the configuration and registers the backend once per
//!    process; the configuration applies to the models loaded after the call.
//! 2. At load, `block_size` checks that FreeKV can serve the model and fixes the block size
//!    to the page size; `allocate_cache` creates one [`FreeKv`](crate::FreeKv) per model whose
//!    host tier holds the engine's blocks, and hands the engine one small handle tensor pair
//!    per layer: their tensor ids tell each forward call which model and layer it serves.
//! 3. Every forward call becomes a FreeKV prefill or decode of that layer for the batch's
//!    sequences (rows of any length: `mixed_length_batches` lets the engine's scheduler batch
//!    them); the engine reports freed sequences, whose state is dropped (with one log line of
//!    what FreeKV did for that request), and after each scheduling pass how full its block
//!    pool (our host tier) is.
//! 4. The server's `/metrics` shows FreeKV's counters, live sequence states and the pool
//!    (`metrics`). When the engine drops the model, its layers drop the instance and with
//!    it the host tier.

mod backend;
mod batch;
mod layer;
mod metrics;
mod model_check;
mod rank;
mod registry;
mod step_rows;

pub use backend::{configure, loaded_models, register, register_from_env, FreeKvBackend};
pub use registry::LoadedModel;
