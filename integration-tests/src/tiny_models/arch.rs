//! The six architectures: shapes, `config.json`, and the weights (names and shapes exactly as
//! the mistral.rs 0.8.1 loaders in `mistralrs-core/src/models/*.rs` read them).
//!
//! How the random weights are scaled (see `mod.rs` for why):
//! - every projection is N(0, s^2) with s chosen from the fan-in so that, after the pre-norm,
//!   q and k components have std `sqrt(ATTN_SCORE_STD)`: raw attention scores
//!   `q.k / sqrt(64)` then have std ~ATTN_SCORE_STD, which makes attention peaked;
//! - v / o / MLP keep each branch's output at std ~1, the size of the embeddings, so the
//!   residual stream is a balanced sum and the final RMSNorm is well-conditioned;
//! - lm_head rows have std LOGIT_STD / sqrt(hidden) (logits of std ~LOGIT_STD, so the top-1 /
//!   top-2 gap is several units), and rows of tokens the models must never emit (bytes that
//!   are not printable ASCII or a newline, `<s>`, `</s>`) are zero: those logits are 0 while
//!   the winner is always far above 0, so greedy output is plain text and never stops early.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::rng::Rng;
use super::safetensors::Tensor;
use super::tokenizer::TinyTokenizer;

pub const HEAD_DIM: usize = 64;
pub const MAX_POSITION_EMBEDDINGS: usize = 8192;
/// Target std of the raw attention scores q.k/sqrt(d): large enough that attention is peaked.
pub const ATTN_SCORE_STD: f64 = 3.5;
/// Target std of the logits.
pub const LOGIT_STD: f64 = 10.0;
/// gemma2: std of the (tied) embedding entries. The input is scaled by sqrt(hidden), and the
/// tied lm_head makes the residual copy of the current token a self-logit bias; keeping the
/// embedding small relative to the branch outputs keeps that bias well below LOGIT_STD.
const GEMMA_EMB_STD: f64 = 0.002;

/// The architectures the tiny models cover.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Arch {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    Phi3,
    Gemma2,
}

impl Arch {
    pub const ALL: [Arch; 6] = [
        Arch::Llama,
        Arch::Mistral,
        Arch::Qwen2,
        Arch::Qwen3,
        Arch::Phi3,
        Arch::Gemma2,
    ];

    /// The engine's loader name (`mistralrs run text -a <name>`).
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Mistral => "mistral",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Phi3 => "phi3",
            Arch::Gemma2 => "gemma2",
        }
    }

    /// The Hugging Face class in `config.json` `architectures` (what auto mode reads).
    pub fn hf_class(self) -> &'static str {
        match self {
            Arch::Llama => "LlamaForCausalLM",
            Arch::Mistral => "MistralForCausalLM",
            Arch::Qwen2 => "Qwen2ForCausalLM",
            Arch::Qwen3 => "Qwen3ForCausalLM",
            Arch::Phi3 => "Phi3ForCausalLM",
            Arch::Gemma2 => "Gemma2ForCausalLM",
        }
    }

    pub fn from_name(name: &str) -> Option<Arch> {
        Arch::ALL.into_iter().find(|a| a.name() == name)
    }

    /// (query heads, kv heads, layers): head groups of 2, 4, 3, 4, 1 and 2.
    pub fn shape(self) -> (usize, usize, usize) {
        match self {
            Arch::Llama => (4, 2, 2),
            Arch::Mistral => (4, 1, 3),
            Arch::Qwen2 => (6, 2, 2),
            Arch::Qwen3 => (8, 2, 2),
            Arch::Phi3 => (4, 4, 2),
            Arch::Gemma2 => (4, 2, 2),
        }
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The sizes of one tiny model.
#[derive(Clone, Debug, PartialEq)]
pub struct Spec {
    pub arch: Arch,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub vocab: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// gemma2 only: the sliding window of its even layers (larger than any test context).
    pub sliding_window: usize,
    pub attn_softcap: f64,
    pub final_softcap: f64,
}

impl Spec {
    pub fn new(arch: Arch, vocab: usize) -> Self {
        let (heads, kv_heads, layers) = arch.shape();
        let hidden = heads * HEAD_DIM;
        Self {
            arch,
            layers,
            heads,
            kv_heads,
            head_dim: HEAD_DIM,
            hidden,
            intermediate: 2 * hidden,
            vocab,
            rms_norm_eps: 1e-6,
            rope_theta: 10_000.0,
            sliding_window: MAX_POSITION_EMBEDDINGS,
            attn_softcap: 50.0,
            final_softcap: 50.0,
        }
    }

    pub fn group(&self) -> usize {
        self.heads / self.kv_heads
    }

    /// `config.json`: the keys each 0.8.1 `Config` requires, plus the usual HF ones.
    pub fn config_json(&self, tok: &TinyTokenizer) -> Value {
        let mut c = json!({
            "architectures": [self.arch.hf_class()],
            "model_type": self.arch.name(),
            "hidden_act": "silu",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "vocab_size": self.vocab,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": MAX_POSITION_EMBEDDINGS,
            "tie_word_embeddings": false,
            "bos_token_id": tok.bos_id,
            "eos_token_id": tok.eos_id,
            "torch_dtype": "float32",
        });
        let o = c.as_object_mut().unwrap();
        match self.arch {
            Arch::Llama => {
                o.insert("rope_scaling".into(), Value::Null);
            }
            Arch::Mistral => {
                o.insert("sliding_window".into(), Value::Null);
                o.insert("head_dim".into(), json!(self.head_dim));
            }
            Arch::Qwen2 => {
                // qwen2 windows attention whenever `sliding_window` is set (it ignores
                // `use_sliding_window`), so leave it unset.
                o.insert("sliding_window".into(), Value::Null);
                o.insert("use_sliding_window".into(), json!(false));
                o.insert("max_window_layers".into(), json!(self.layers));
            }
            Arch::Qwen3 => {
                // Must be null: qwen3 hands cfg.sliding_window to paged attention even when
                // use_sliding_window is false.
                o.insert("sliding_window".into(), Value::Null);
                o.insert("use_sliding_window".into(), json!(false));
                o.insert("max_window_layers".into(), json!(self.layers));
                o.insert("head_dim".into(), json!(self.head_dim));
            }
            Arch::Phi3 => {
                o.insert(
                    "original_max_position_embeddings".into(),
                    json!(MAX_POSITION_EMBEDDINGS),
                );
                o.insert("rope_scaling".into(), Value::Null);
                o.insert("sliding_window".into(), Value::Null);
            }
            Arch::Gemma2 => {
                o.insert("hidden_act".into(), json!("gelu_pytorch_tanh"));
                o.insert("hidden_activation".into(), json!("gelu_pytorch_tanh"));
                o.insert("head_dim".into(), json!(self.head_dim));
                o.insert("attention_bias".into(), json!(false));
                o.insert("sliding_window".into(), json!(self.sliding_window));
                o.insert("query_pre_attn_scalar".into(), json!(self.head_dim));
                o.insert("attn_logit_softcapping".into(), json!(self.attn_softcap));
                o.insert("final_logit_softcapping".into(), json!(self.final_softcap));
                o.insert("tie_word_embeddings".into(), json!(true));
            }
        }
        c
    }

    /// All weights, deterministically from `seed`. Each tensor has its own stream (seeded by
    /// its name), so the weights do not depend on the order in which they are drawn.
    pub fn weights(&self, tok: &TinyTokenizer, seed: u64) -> BTreeMap<String, Tensor> {
        let (h, i, v, d) = (self.hidden, self.intermediate, self.vocab, self.head_dim);
        let (q_out, kv_out) = (self.heads * d, self.kv_heads * d);
        let gemma = self.arch == Arch::Gemma2;
        let mut w = BTreeMap::new();
        let normal = |name: &str, shape: Vec<usize>, std: f64| {
            let n = shape.iter().product();
            Tensor::new(shape, Rng::for_name(seed, name).normal_vec(n, std))
        };
        // RMSNorm weights: `base` plus a little jitter (gemma stores weight - 1).
        let norm = |name: &str, n: usize, base: f64| {
            let mut t = normal(name, vec![n], 0.05 * base.abs().max(0.2));
            for x in &mut t.data {
                *x += base as f32;
            }
            t
        };
        let gemma_base = |effective: f64| if gemma { effective - 1.0 } else { effective };
        let qk_std = ATTN_SCORE_STD.sqrt() / (h as f64).sqrt();
        let v_std = 1.0 / (h as f64).sqrt();
        let o_std = 1.0 / (q_out as f64).sqrt();
        let up_std = 1.0 / (h as f64).sqrt();
        let down_std = 1.6 / (i as f64).sqrt();

        // Embeddings. gemma2 ties lm_head to them, so the rows of tokens it must not emit are
        // shrunk (still non-zero: they are valid inputs, and RMSNorm restores their scale).
        let emb_std = if gemma { GEMMA_EMB_STD } else { 1.0 };
        let mut emb = normal("model.embed_tokens.weight", vec![v, h], emb_std);
        if gemma {
            for id in 0..v {
                if !tok.is_printable(id as u32) {
                    emb.data[id * h..(id + 1) * h]
                        .iter_mut()
                        .for_each(|x| *x *= 0.05);
                }
            }
        }
        w.insert("model.embed_tokens.weight".to_string(), emb);

        for l in 0..self.layers {
            let p = format!("model.layers.{l}");
            let a = format!("{p}.self_attn");
            if self.arch == Arch::Phi3 {
                // Fused [q; k; v] rows, each block scaled as its unfused counterpart.
                let name = format!("{a}.qkv_proj.weight");
                let mut t = normal(&name, vec![q_out + 2 * kv_out, h], 1.0);
                for (r, row) in t.data.chunks_mut(h).enumerate() {
                    let s = if r < q_out + kv_out { qk_std } else { v_std };
                    row.iter_mut().for_each(|x| *x *= s as f32);
                }
                w.insert(name, t);
            } else {
                for (proj, out, std) in [
                    ("q_proj", q_out, qk_std),
                    ("k_proj", kv_out, qk_std),
                    ("v_proj", kv_out, v_std),
                ] {
                    let name = format!("{a}.{proj}.weight");
                    w.insert(name.clone(), normal(&name, vec![out, h], std));
                }
            }
            let name = format!("{a}.o_proj.weight");
            w.insert(name.clone(), normal(&name, vec![h, q_out], o_std));
            if self.arch == Arch::Qwen2 {
                // A content-independent part of q and k: with RoPE it adds position-dependent
                // attention patterns on top of the content-based ones.
                let b_std = 0.5 * ATTN_SCORE_STD.sqrt();
                for (proj, out, std) in [
                    ("q_proj", q_out, b_std),
                    ("k_proj", kv_out, b_std),
                    ("v_proj", kv_out, 0.1),
                ] {
                    let name = format!("{a}.{proj}.bias");
                    w.insert(name.clone(), normal(&name, vec![out], std));
                }
            }
            if self.arch == Arch::Qwen3 {
                // q_norm / k_norm normalise each head to RMS 1 before RoPE: their weights set
                // the component std, hence the score std q.k/8 = wq * wk.
                let s = ATTN_SCORE_STD.sqrt();
                for n in ["q_norm", "k_norm"] {
                    let name = format!("{a}.{n}.weight");
                    w.insert(name.clone(), norm(&name, d, s));
                }
            }
            let m = format!("{p}.mlp");
            if self.arch == Arch::Phi3 {
                let name = format!("{m}.gate_up_proj.weight");
                w.insert(name.clone(), normal(&name, vec![2 * i, h], up_std));
            } else {
                for proj in ["gate_proj", "up_proj"] {
                    let name = format!("{m}.{proj}.weight");
                    w.insert(name.clone(), normal(&name, vec![i, h], up_std));
                }
            }
            let name = format!("{m}.down_proj.weight");
            w.insert(name.clone(), normal(&name, vec![h, i], down_std));

            let name = format!("{p}.input_layernorm.weight");
            w.insert(name.clone(), norm(&name, h, gemma_base(1.0)));
            if gemma {
                // gemma2 normalises each branch's output. Layer 0's attention branch is kept
                // as small as the (small) embedding so that layer 0's MLP sees the current
                // token and re-embeds it at full scale; later branches have RMS 1.
                let attn_out = if l == 0 {
                    GEMMA_EMB_STD * (h as f64).sqrt()
                } else {
                    1.0
                };
                for (n, base) in [
                    ("post_attention_layernorm", attn_out),
                    ("pre_feedforward_layernorm", 1.0),
                    ("post_feedforward_layernorm", 1.0),
                ] {
                    let name = format!("{p}.{n}.weight");
                    w.insert(name.clone(), norm(&name, h, gemma_base(base)));
                }
            } else {
                let name = format!("{p}.post_attention_layernorm.weight");
                w.insert(name.clone(), norm(&name, h, 1.0));
            }
        }

        if gemma {
            // Tied lm_head: logits = E . (f * x_hat) have std GEMMA_EMB_STD * f * sqrt(h).
            let f = LOGIT_STD / (GEMMA_EMB_STD * (h as f64).sqrt());
            w.insert(
                "model.norm.weight".to_string(),
                norm("model.norm.weight", h, gemma_base(f)),
            );
        } else {
            w.insert(
                "model.norm.weight".to_string(),
                norm("model.norm.weight", h, 1.0),
            );
            let mut lm = normal("lm_head.weight", vec![v, h], LOGIT_STD / (h as f64).sqrt());
            for id in 0..v {
                if !tok.is_printable(id as u32) {
                    lm.data[id * h..(id + 1) * h]
                        .iter_mut()
                        .for_each(|x| *x = 0.0);
                }
            }
            w.insert("lm_head.weight".to_string(), lm);
        }
        w
    }
}
