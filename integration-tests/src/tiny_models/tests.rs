use std::collections::BTreeMap;
use std::path::PathBuf;

use super::reference::{greedy, AttnOrder, Reference};
use super::*;

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("freekv-tiny-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// Tensor names and shapes as the 0.8.1 loaders read them, written out independently of
/// `arch.rs` from `mistralrs-core/src/models/{llama,mistral,qwen2,qwen3,phi3,gemma2}.rs`.
fn expected_tensors(m: &TinyModel) -> BTreeMap<String, Vec<usize>> {
    let (h, v, d) = (m.hidden, m.vocab, m.head_dim);
    let i = 2 * h;
    let (q, kv) = (m.heads * d, m.kv_heads * d);
    let mut e = BTreeMap::new();
    let mut add = |n: String, s: Vec<usize>| {
        e.insert(n, s);
    };
    add("model.embed_tokens.weight".into(), vec![v, h]);
    add("model.norm.weight".into(), vec![h]);
    if m.arch != Arch::Gemma2 {
        add("lm_head.weight".into(), vec![v, h]);
    }
    for l in 0..m.layers {
        let p = format!("model.layers.{l}");
        add(format!("{p}.input_layernorm.weight"), vec![h]);
        add(format!("{p}.post_attention_layernorm.weight"), vec![h]);
        add(format!("{p}.self_attn.o_proj.weight"), vec![h, q]);
        add(format!("{p}.mlp.down_proj.weight"), vec![h, i]);
        if m.arch == Arch::Phi3 {
            add(
                format!("{p}.self_attn.qkv_proj.weight"),
                vec![q + 2 * kv, h],
            );
            add(format!("{p}.mlp.gate_up_proj.weight"), vec![2 * i, h]);
        } else {
            add(format!("{p}.self_attn.q_proj.weight"), vec![q, h]);
            add(format!("{p}.self_attn.k_proj.weight"), vec![kv, h]);
            add(format!("{p}.self_attn.v_proj.weight"), vec![kv, h]);
            add(format!("{p}.mlp.gate_proj.weight"), vec![i, h]);
            add(format!("{p}.mlp.up_proj.weight"), vec![i, h]);
        }
        if m.arch == Arch::Qwen2 {
            add(format!("{p}.self_attn.q_proj.bias"), vec![q]);
            add(format!("{p}.self_attn.k_proj.bias"), vec![kv]);
            add(format!("{p}.self_attn.v_proj.bias"), vec![kv]);
        }
        if m.arch == Arch::Qwen3 {
            add(format!("{p}.self_attn.q_norm.weight"), vec![d]);
            add(format!("{p}.self_attn.k_norm.weight"), vec![d]);
        }
        if m.arch == Arch::Gemma2 {
            add(format!("{p}.pre_feedforward_layernorm.weight"), vec![h]);
            add(format!("{p}.post_feedforward_layernorm.weight"), vec![h]);
        }
    }
    e
}

/// Config keys each loader requires (no serde default), per the 0.8.1 `Config` structs.
fn required_keys(arch: Arch) -> &'static [&'static str] {
    match arch {
        Arch::Llama => &[
            "hidden_act",
            "hidden_size",
            "intermediate_size",
            "vocab_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "rms_norm_eps",
            "rope_theta",
            "max_position_embeddings",
        ],
        Arch::Mistral => &[
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "hidden_act",
            "max_position_embeddings",
            "rms_norm_eps",
        ],
        Arch::Qwen2 => &[
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
            "rope_theta",
            "rms_norm_eps",
            "hidden_act",
        ],
        Arch::Qwen3 => &[
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "hidden_act",
            "max_position_embeddings",
            "rms_norm_eps",
            "rope_theta",
            "max_window_layers",
            "use_sliding_window",
        ],
        Arch::Phi3 => &[
            "vocab_size",
            "hidden_act",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "rms_norm_eps",
            "rope_theta",
            "max_position_embeddings",
            "original_max_position_embeddings",
        ],
        Arch::Gemma2 => &[
            "attention_bias",
            "head_dim",
            "hidden_size",
            "intermediate_size",
            "num_attention_heads",
            "num_hidden_layers",
            "num_key_value_heads",
            "rms_norm_eps",
            "rope_theta",
            "vocab_size",
            "sliding_window",
            "query_pre_attn_scalar",
            "max_position_embeddings",
        ],
    }
}

fn read_json(p: PathBuf) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap()
}

#[test]
fn files_match_the_loaders() {
    let root = scratch("files");
    for m in write_all(&root, 3).unwrap() {
        let cfg = read_json(m.dir.join("config.json"));
        for k in required_keys(m.arch) {
            assert!(
                !cfg[*k].is_null(),
                "{}: config.json lacks required key {k}",
                m.arch
            );
        }
        assert_eq!(cfg["architectures"][0], m.arch.hf_class());
        assert_eq!(cfg["vocab_size"], m.vocab);
        assert!(cfg["max_position_embeddings"].as_u64().unwrap() >= 8192);
        assert_eq!(m.hidden, m.heads * 64);
        if m.arch == Arch::Qwen3 {
            assert!(cfg.get("sliding_window").unwrap().is_null());
        }
        if m.arch == Arch::Gemma2 {
            assert!(cfg["sliding_window"].as_u64().unwrap() >= 8192);
            assert!(cfg["hidden_act"].is_string() || cfg["hidden_activation"].is_string());
        }

        let tj = read_json(m.dir.join("tokenizer.json"));
        assert_eq!(tj["model"]["vocab"].as_object().unwrap().len(), m.vocab);
        let added = tj["added_tokens"].as_array().unwrap();
        assert_eq!(added.len(), 2);
        assert_eq!(added[1]["id"], m.eos_id);
        let tc = read_json(m.dir.join("tokenizer_config.json"));
        assert_eq!(tc["eos_token"], "</s>");
        assert!(tc["chat_template"]
            .as_str()
            .unwrap()
            .contains("add_generation_prompt"));
        let gc = read_json(m.dir.join("generation_config.json"));
        assert_eq!(gc["eos_token_id"], m.eos_id);

        let w = safetensors::read(&m.dir.join("model.safetensors")).unwrap();
        let got: BTreeMap<String, Vec<usize>> = w
            .iter()
            .map(|(k, t)| (k.clone(), t.shape.clone()))
            .collect();
        assert_eq!(got, expected_tensors(&m), "{}: tensor names/shapes", m.arch);
        assert_eq!(
            w,
            m.spec().weights(&TinyTokenizer::new(), 3),
            "{}: file != memory",
            m.arch
        );
    }
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn same_seed_same_bytes() {
    let tok = TinyTokenizer::new();
    let s = Spec::new(Arch::Llama, tok.vocab_size());
    let dir = std::env::temp_dir().join(format!("tiny-same-seed-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bytes = |seed: u64, name: &str| {
        let p = dir.join(name);
        safetensors::write(&p, &s.weights(&tok, seed)).unwrap();
        std::fs::read(p).unwrap()
    };
    let a = bytes(11, "a");
    assert_eq!(a, bytes(11, "b"));
    assert_ne!(a, bytes(12, "c"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn filler_text_is_long_and_tokenizes_compactly() {
    let t = filler_text(1, 1000);
    let n = TinyTokenizer::new().encode(&t).len();
    assert!((1000..1100).contains(&n), "{n} tokens");
    assert_eq!(t, filler_text(1, 1000));
}

/// Greedy decoding with the naive reference forward, for every arch: margins, attention
/// peakedness, variety, and agreement when the attention sums in another order (blocked,
/// reversed) or is perturbed by a relative 1e-5 / 1e-3. Prints a table (`--nocapture`).
/// Sizes: FREEKV_TINY_PROMPT (default 192 tokens) and FREEKV_TINY_GEN (default 160).
#[test]
fn greedy_is_robust_peaked_and_varied() {
    let env = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let (prompt_len, gen) = (env("FREEKV_TINY_PROMPT", 192), env("FREEKV_TINY_GEN", 160));
    let tok = TinyTokenizer::new();
    let mut prompt = vec![tok.bos_id];
    prompt.extend(tok.encode(&format!("user: {}\nassistant:", filler_text(5, prompt_len))));
    println!(
        "prompt {} tokens, {gen} generated; margin = top1 - top2 logit",
        prompt.len()
    );
    println!(
        "arch     q/kv  min-margin  med-margin  logit-std  top1-attn  keys@90%  distinct  repeats  period  reorder  1e-5  1e-3"
    );
    let mut failures = Vec::new();
    for arch in Arch::ALL {
        let spec = Spec::new(arch, tok.vocab_size());
        let mut r = Reference::new(spec.clone(), spec.weights(&tok, 1));
        r.collect_stats = true;
        let base = greedy(&mut r, &prompt, gen).unwrap();
        let stats = r.stats.clone();
        r.collect_stats = false;

        r.order = AttnOrder::BlockedReverse(16);
        let reordered = greedy(&mut r, &prompt, gen).unwrap();
        r.order = AttnOrder::Sequential;
        let mut agree = Vec::new();
        for eps in [1e-5f32, 1e-3] {
            r.perturb = eps;
            let p = greedy(&mut r, &prompt, gen).unwrap();
            let same = base
                .tokens
                .iter()
                .zip(&p.tokens)
                .take_while(|(a, b)| a == b)
                .count();
            agree.push(same);
        }
        let med_std = {
            let mut s = base.logit_std.clone();
            s.sort_by(|a, b| a.partial_cmp(b).unwrap());
            s[s.len() / 2]
        };
        println!(
            "{:<8} {}/{}  {:>10.3}  {:>10.3}  {:>9.2}  {:>9.3}  {:>8.2}  {:>8}  {:>7.3}  {:>6}  {:>7}  {:>4}  {:>4}",
            arch.name(),
            spec.heads,
            spec.kv_heads,
            base.min_margin(),
            base.median_margin(),
            med_std,
            stats.mean_top1(),
            stats.mean_keys_for_90pct(),
            base.distinct(),
            base.immediate_repeats(),
            base.tail_period().map_or("none".to_string(), |p| p.to_string()),
            if reordered.tokens == base.tokens { "same" } else { "DIFF" },
            agree[0],
            agree[1],
        );
        println!("         text: {:?}", tok.decode(&base.tokens, false));
        let mut check = |ok: bool, what: String| {
            if !ok {
                failures.push(format!("{arch}: {what}"));
            }
        };
        check(
            base.tokens.iter().all(|&t| tok.is_printable(t)),
            "non-printable output".into(),
        );
        check(
            reordered.tokens == base.tokens,
            "attention order changed greedy tokens".into(),
        );
        check(
            agree[0] == gen,
            format!("a 1e-5 perturbation changed token {}", agree[0]),
        );
        check(
            base.distinct() >= 12,
            format!("only {} distinct tokens", base.distinct()),
        );
        check(
            base.tail_period().is_none_or(|p| p >= 4),
            format!("short loop {:?}", base.tail_period()),
        );
        check(
            stats.mean_top1() > 0.2,
            format!("attention not peaked ({:.3})", stats.mean_top1()),
        );
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Writes all six models into $FREEKV_TINY_MODELS_DIR (default target-dir-independent
/// /tmp/freekv-tiny-models) for manual runs with the engine's CLI:
/// `cargo test -p freekv-integration-tests write_tiny_models_for_cli -- --ignored --nocapture`
#[test]
#[ignore]
fn write_tiny_models_for_cli() {
    let root = std::env::var_os("FREEKV_TINY_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp/freekv-tiny-models"));
    let seed = std::env::var("FREEKV_TINY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    for m in write_all(&root, seed).unwrap() {
        println!(
            "{:<7} {}  layers {} heads {}/{} (group {}) hidden {} vocab {} eos {}",
            m.arch.name(),
            m.dir.display(),
            m.layers,
            m.heads,
            m.kv_heads,
            m.group(),
            m.hidden,
            m.vocab,
            m.eos_id
        );
    }
}
