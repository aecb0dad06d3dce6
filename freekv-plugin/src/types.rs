//! The plain types of the public API: the model's geometry, the host-tier dtype, per-call
//! attention parameters and the batch rows the engine glue hands over.

use candle_core::Tensor;

/// The model's attention geometry (the same for every layer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelShape {
    /// Attention layers.
    pub num_layers: usize,
    /// Query heads per layer.
    pub num_q_heads: usize,
    /// KV heads per layer (a divisor of the query heads).
    pub num_kv_heads: usize,
    /// Dimension of each head's keys, values and queries.
    pub head_dim: usize,
}

impl ModelShape {
    /// Query heads per KV head (the GQA group size).
    pub fn group(&self) -> usize {
        self.num_q_heads / self.num_kv_heads.max(1)
    }
}

/// Storage dtype of the host tier (and of the copy device tier).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvDType {
    /// 32-bit IEEE floats.
    F32,
    /// 16-bit IEEE floats.
    F16,
    /// bfloat16.
    BF16,
}

/// Per-call attention parameters from the engine.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttnParams {
    /// Multiplies `q . k` before the softmax (usually `1/sqrt(head_dim)`).
    pub softmax_scale: f32,
    /// Logit soft-capping (gemma2): `logits = c * tanh(logits / c)`.
    pub softcap: Option<f32>,
    /// Sliding window: a query at position `pos` sees keys at positions `> pos - window`.
    pub sliding_window: Option<usize>,
}

impl AttnParams {
    /// Plain causal attention with the given scale.
    pub fn scaled(softmax_scale: f32) -> Self {
        Self {
            softmax_scale,
            softcap: None,
            sliding_window: None,
        }
    }

    /// A scaled logit after the layer's soft-capping (unchanged without one).
    #[inline]
    pub fn cap(&self, logit: f32) -> f32 {
        match self.softcap {
            Some(c) => c * (logit / c).tanh(),
            None => logit,
        }
    }

    /// First key position a query at `pos` may attend to.
    pub fn first_visible(&self, pos: usize) -> usize {
        match self.sliding_window {
            Some(w) => (pos + 1).saturating_sub(w),
            None => 0,
        }
    }
}

/// One batch row of a prompt. `block_table` = the engine's block ids of this sequence covering
/// `cached_len + new_len` tokens (token `t` lives in block `block_table[t / page_size]` at
/// offset `t % page_size`). `cached_len > 0` on a prefix-cache hit: those tokens' KV are
/// already in the host tier (written earlier by another sequence sharing these blocks); q/k/v
/// then hold only the new tokens.
#[derive(Clone, Copy, Debug)]
pub struct PrefillRow<'a> {
    /// The sequence (unique among the model's live sequences).
    pub seq_id: u64,
    /// Its blocks, covering `cached_len + new_len` tokens.
    pub block_table: &'a [u32],
    /// Tokens already in the host tier (a prefix-cache hit).
    pub cached_len: usize,
    /// Tokens this call adds (the row's q/k/v; a shorter row of the batch is padded).
    pub new_len: usize,
}

/// One layer's new queries, keys and values for a batch of rows: candle CPU tensors of any
/// float dtype, `(B, H, L, D)` for a prompt (rows shorter than `L` padded at the end) and
/// `(B, H, D)` for a decode step, with `Hq` query heads in `q` and `Hkv` KV heads in `k`, `v`.
#[derive(Clone, Copy, Debug)]
pub struct Qkv<'a> {
    /// The queries.
    pub q: &'a Tensor,
    /// The keys.
    pub k: &'a Tensor,
    /// The values.
    pub v: &'a Tensor,
}

impl<'a> Qkv<'a> {
    /// The batch's queries, keys and values.
    pub fn new(q: &'a Tensor, k: &'a Tensor, v: &'a Tensor) -> Self {
        Self { q, k, v }
    }
}

/// One batch row of a decode step; `context_len` includes the token being decoded now.
#[derive(Clone, Copy, Debug)]
pub struct DecodeRow<'a> {
    /// The sequence (prefilled before its first decode step).
    pub seq_id: u64,
    /// Its blocks, covering `context_len` tokens.
    pub block_table: &'a [u32],
    /// Its context, the token decoded now included.
    pub context_len: usize,
}
