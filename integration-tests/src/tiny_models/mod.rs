//! Tiny random-weight Hugging Face model directories that mistral.rs 0.8.1 loads from a local
//! path, generated on the fly and deterministically from a seed.
//!
//! ```no_run
//! use freekv_integration_tests::tiny_models::{write_tiny_model, Arch};
//! let m = write_tiny_model(Arch::Qwen2, std::path::Path::new("/tmp/tiny-qwen2"), 7)?;
//! // mistralrs run -m /tmp/tiny-qwen2 --cpu --dtype f32 --token-source none -i "hello"
//! # anyhow::Ok(())
//! ```
//!
//! Each directory holds `config.json`, `model.safetensors` (F32, written by hand),
//! `tokenizer.json` (GPT-2 byte-level BPE, 320 ids), `tokenizer_config.json` (a trivial chat
//! template, `<s>` / `</s>`) and `generation_config.json` (eos/bos ids, greedy, 256 new tokens
//! for the CLI).
//!
//! The models are built for greedy-decoding comparisons between two attention paths that
//! differ only in floating-point details (FreeKV vs the engine's eager attention):
//! - logits have std ~10 and the top-1 / top-2 gap is typically several units, so reordering a
//!   sum never flips a greedy token;
//! - attention is peaked (raw scores of std ~2.5): a few keys hold most of the mass, so a
//!   KV-retrieval method that drops the wrong ones changes the output;
//! - the residual stream is a balanced sum of branch outputs of RMS ~1, and tokens that are
//!   not printable ASCII (and the specials) can never win, so generations are plain text that
//!   never stops at EOS and does not collapse into a one-token loop.
//!
//! The `tests` below measure all of this with the naive reference forward in [`reference`].

pub mod arch;
pub mod reference;
pub mod rng;
pub mod safetensors;
pub mod tokenizer;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::json;

pub use arch::{Arch, Spec};
pub use tokenizer::TinyTokenizer;

/// A generated model directory and its sizes.
#[derive(Clone, Debug, PartialEq)]
pub struct TinyModel {
    pub arch: Arch,
    pub dir: PathBuf,
    pub seed: u64,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub hidden: usize,
    pub vocab: usize,
    pub bos_id: u32,
    pub eos_id: u32,
}

impl TinyModel {
    /// Query heads per KV head.
    pub fn group(&self) -> usize {
        self.heads / self.kv_heads
    }

    pub fn spec(&self) -> Spec {
        Spec::new(self.arch, self.vocab)
    }

    pub fn tokenizer(&self) -> TinyTokenizer {
        TinyTokenizer::new()
    }

    /// KV-cache bytes per token at f32 (all layers, K and V).
    pub fn kv_bytes_per_token_f32(&self) -> usize {
        self.layers * 2 * self.kv_heads * self.head_dim * 4
    }
}

/// The chat template: `<s>` then `role: content` lines, then `assistant:`.
pub const CHAT_TEMPLATE: &str = "{{ bos_token }}{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}";

/// Writes (or overwrites) the model for `arch` and `seed` into `dir`, creating it if needed.
/// Each file is written to a temporary name and renamed, so a reader never sees half a file.
pub fn write_tiny_model(arch: Arch, dir: &Path, seed: u64) -> Result<TinyModel> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tok = TinyTokenizer::new();
    let spec = Spec::new(arch, tok.vocab_size());
    let put_with = |name: &str, write: &dyn Fn(&Path) -> Result<()>| -> Result<()> {
        let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
        write(&tmp)?;
        std::fs::rename(&tmp, dir.join(name))
            .with_context(|| format!("renaming {} in {}", name, dir.display()))
    };
    let put = |name: &str, bytes: &[u8]| -> Result<()> {
        put_with(name, &|tmp| {
            std::fs::write(tmp, bytes).with_context(|| format!("writing {}", tmp.display()))
        })
    };
    let pretty = |v: &serde_json::Value| serde_json::to_vec_pretty(v).expect("json");

    put("config.json", &pretty(&spec.config_json(&tok)))?;
    put("tokenizer.json", tokenizer::TOKENIZER_JSON.as_bytes())?;
    put(
        "tokenizer_config.json",
        &pretty(&json!({
            "bos_token": tokenizer::BOS,
            "eos_token": tokenizer::EOS,
            "add_bos_token": false,
            "add_eos_token": false,
            "chat_template": CHAT_TEMPLATE,
            "model_max_length": arch::MAX_POSITION_EMBEDDINGS,
            "tokenizer_class": "PreTrainedTokenizerFast",
        })),
    )?;
    put(
        "generation_config.json",
        &pretty(&json!({
            "bos_token_id": tok.bos_id,
            "eos_token_id": tok.eos_id,
            "do_sample": false,
            "max_new_tokens": 256,
        })),
    )?;
    let weights = spec.weights(&tok, seed);
    put_with("model.safetensors", &|tmp| {
        safetensors::write(tmp, &weights)
    })?;
    Ok(TinyModel {
        arch,
        dir: dir.to_path_buf(),
        seed,
        layers: spec.layers,
        heads: spec.heads,
        kv_heads: spec.kv_heads,
        head_dim: spec.head_dim,
        hidden: spec.hidden,
        vocab: spec.vocab,
        bos_id: tok.bos_id,
        eos_id: tok.eos_id,
    })
}

/// Writes all six models into `root/<arch name>`.
pub fn write_all(root: &Path, seed: u64) -> Result<Vec<TinyModel>> {
    Arch::ALL
        .iter()
        .map(|&a| write_tiny_model(a, &root.join(a.name()), seed))
        .collect()
}

/// Deterministic English-looking filler text of roughly `approx_tokens` tokens (with the tiny
/// tokenizer, about 1.6 tokens per word), for prompts that span many KV pages.
pub fn filler_text(seed: u64, approx_tokens: usize) -> String {
    const WORDS: &[&str] = &[
        "the", "of", "and", "to", "in", "is", "that", "it", "was", "with", "as", "for", "on", "be",
        "at", "by", "this", "had", "not", "are", "but", "from", "or", "have", "an", "they",
        "which", "one", "you", "were", "her", "all", "she", "there", "would", "their", "we", "him",
        "been", "has", "when", "who", "will", "more", "no", "if", "out", "so", "said", "what",
        "up", "its", "about", "into", "than", "them", "can", "only", "other", "new", "some",
        "could", "time", "these", "two", "may", "then", "do", "first", "any", "my", "now", "such",
        "like", "our", "over", "man", "me", "even", "most", "made", "after", "also", "did", "many",
        "before", "must", "through", "back", "years", "where", "much", "your", "way", "well",
        "down", "should", "because", "each", "just", "those", "people", "how", "too", "little",
        "state", "good", "very", "make", "world", "still", "own", "see", "men", "work", "long",
        "get", "here", "between", "both", "life", "being", "under", "never", "day", "same",
        "another", "know", "while", "last", "might", "us", "great", "old", "year", "off", "come",
        "since", "against", "go", "came", "right", "used", "take", "three", "river", "garden",
        "window", "letter", "morning", "quiet",
    ];
    let mut rng = rng::Rng::new(seed);
    let mut out = String::new();
    let tok = TinyTokenizer::new();
    let mut sentence_len = 0;
    while tok.encode(&out).len() < approx_tokens {
        // Re-encoding is quadratic but cheap at these sizes; check every 16 words.
        for _ in 0..16 {
            let w = WORDS[(rng.next_u64() % WORDS.len() as u64) as usize];
            if sentence_len == 0 {
                let mut c = w.chars();
                let first = c.next().unwrap().to_ascii_uppercase();
                if !out.is_empty() {
                    out.push(' ');
                }
                out.push(first);
                out.push_str(c.as_str());
            } else {
                out.push(' ');
                out.push_str(w);
            }
            sentence_len += 1;
            if sentence_len > 6 && rng.next_u64().is_multiple_of(5) {
                out.push('.');
                sentence_len = 0;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests;
