//! The tiny random-weight models of every architecture, stock vs FreeKV.

use std::sync::Arc;

use freekv_integration_tests::engine::{
    agreement, greedy, load, reference_greedy, robust_prefix, Attention, Generation, Source,
};
use freekv_integration_tests::tiny_models::{filler_text, write_tiny_model, Arch};
use freekv_integration_tests::{paths, serial};
use freekv_plugin::{DeviceTierLayout, FreeKvConfig, Mode, Policy, PrefillAttention, Selector};

/// Tokens generated per comparison.
const GENERATE: usize = 200;

fn big_budget() -> FreeKvConfig {
    // Page 16 so a 600-token prompt spans 38 pages; budget above prompt + generation.
    FreeKvConfig {
        page_size: 16,
        budget: 1024,
        sink: 128,
        window: 128,
        ..FreeKvConfig::default()
    }
}

fn small_budget() -> FreeKvConfig {
    // 128 tokens: 32 sink + 32 window + 4 selected pages of 16, over a ~1,000-token context.
    FreeKvConfig {
        page_size: 16,
        budget: 128,
        sink: 32,
        window: 32,
        tau: 0.9,
        ..FreeKvConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budget_above_context_gives_the_stock_tokens_on_every_arch() -> anyhow::Result<()> {
    let _serial = serial();
    for (i, arch) in Arch::ALL.into_iter().enumerate() {
        let dir = paths::scratch(&format!("tiny-equal-{}", arch.name()))?;
        let model = write_tiny_model(arch, &dir, 11 + i as u64)?;
        let prompt = filler_text(100 + i as u64, 600);
        let stock = load(Source::Plain(&model.dir), &Attention::Stock, 4).await?;
        let want = greedy(&stock.model, &prompt, GENERATE).await?;
        drop(stock);
        assert_eq!(
            want.tokens.len(),
            GENERATE,
            "{}: stock stopped early",
            arch.name()
        );
        // The CPU's defaults (FreeKV's prefill kernel, attention over host pages in place),
        // then a GPU's orchestration on host memory: the engine's own attention for the
        // prompt, the dense layer's pages and the short context's working set copied; and
        // FreeKV's prefill attention on that device (each query a decode row).
        for (prefill, tier) in [
            (PrefillAttention::FreeKv, DeviceTierLayout::InPlace),
            (PrefillAttention::Engine, DeviceTierLayout::Copy),
            (PrefillAttention::FreeKv, DeviceTierLayout::Copy),
        ] {
            let config = FreeKvConfig {
                prefill_attention: prefill,
                device_tier: tier,
                ..big_budget()
            };
            let fkv = load(Source::Plain(&model.dir), &Attention::freekv(config), 4).await?;
            let got = greedy(&fkv.model, &prompt, GENERATE).await?;
            let (prefix, _) = agreement(&want.tokens, &got.tokens);
            assert_eq!(
                prefix,
                GENERATE,
                "{} (prefill {prefill:?}, {tier:?}): FreeKV diverges from stock at token {prefix}: stock \
                 {:?} vs FreeKV {:?}",
                arch.name(),
                want.tokens.get(prefix),
                got.tokens.get(prefix)
            );
            let c = fkv.freekv.as_ref().expect("FreeKV instance").counters();
            // Every layer decoded every generated token through FreeKV.
            assert!(
                c.total.decode_steps as usize >= (GENERATE - 1) * model.layers,
                "{}: {} FreeKV decode steps for {GENERATE} tokens x {} layers",
                arch.name(),
                c.total.decode_steps,
                model.layers
            );
            assert!(
                c.total.prefill_tokens as usize >= 300 * model.layers,
                "{}: {} prompt tokens written",
                arch.name(),
                c.total.prefill_tokens
            );
            // FreeKV's kernel attends every prompt token it is asked to, and only the
            // sliding-window layers' ones when the engine attends the prompt.
            let attended = c.total.prefill_attended;
            match prefill {
                PrefillAttention::FreeKv => assert_eq!(attended, c.total.prefill_tokens),
                // gemma2: its even layers use a sliding window.
                _ if matches!(arch, Arch::Gemma2) => {
                    assert!(attended > 0 && attended < c.total.prefill_tokens)
                }
                _ => assert_eq!(attended, 0, "{}", arch.name()),
            }
            println!(
                "{:8} stock == FreeKV (prefill {prefill:?}, {tier:?}) for {GENERATE} tokens, \
                 {attended} of {} prompt tokens attended by FreeKV",
                arch.name(),
                c.total.prefill_tokens
            );
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_budget_completes_and_reports_agreement() -> anyhow::Result<()> {
    let _serial = serial();
    println!(
        "arch      mode       selector  prefix  agree  sparse-steps  corrected-heads  pages-recalled"
    );
    for (i, arch) in Arch::ALL.into_iter().enumerate() {
        let dir = paths::scratch(&format!("tiny-small-{}", arch.name()))?;
        let model = write_tiny_model(arch, &dir, 21 + i as u64)?;
        let prompt = filler_text(200 + i as u64, 1000);
        let stock = load(Source::Plain(&model.dir), &Attention::Stock, 4).await?;
        let want = greedy(&stock.model, &prompt, GENERATE).await?;
        drop(stock);
        // One load; every policy answers the same prompt (switched between requests): full
        // FreeKV and sync with today's selector, the rerank selector, the oracle.
        let fkv = load(
            Source::Plain(&model.dir),
            &Attention::freekv(small_budget()),
            4,
        )
        .await?;
        let fk = fkv.freekv.as_ref().expect("FreeKV instance");
        for (mode, selector) in [
            (Mode::FreeKv, Selector::Quest),
            (Mode::Sync, Selector::Quest),
            (Mode::FreeKv, Selector::Rerank),
            (Mode::Sync, Selector::Oracle),
        ] {
            wait_until(
                10,
                5,
                || fk.live_sequences() == 0,
                || {
                    format!(
                        "{}: the last request's FreeKV state was never freed",
                        arch.name()
                    )
                },
            )
            .await;
            fk.set_policy(Policy {
                mode,
                selector,
                ..fk.policy()
            })?;
            let before = fk.counters().total;
            let got = greedy(&fkv.model, &prompt, GENERATE).await?;
            assert_eq!(
                got.tokens.len(),
                GENERATE,
                "{} {mode:?} {selector:?}: generation stopped early",
                arch.name()
            );
            let c = fk.counters().total.since(&before);
            assert!(
                c.sparse_steps > 0,
                "{} {mode:?} {selector:?}: the small budget never went sparse",
                arch.name()
            );
            let (prefix, agree) = agreement(&want.tokens, &got.tokens);
            println!(
                "{:8}  {:9}  {:8}  {prefix:6}  {agree:5.3}  {:12}  {:15}  {:14}",
                arch.name(),
                format!("{mode:?}"),
                format!("{selector:?}"),
                c.sparse_steps,
                c.heads_corrected,
                c.pages_recalled
            );
        }
    }
    Ok(())
}

/// Logit margin under which two greedy paths may legitimately part (float rounding differs
/// with batch composition, in the stock engine too).
const NEAR_TIE: f32 = 0.05;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_of_different_lengths_stay_on_their_own_path() -> anyhow::Result<()> {
    let _serial = serial();
    let dir = paths::scratch("tiny-concurrent")?;
    let model = write_tiny_model(Arch::Qwen2, &dir, 31)?;
    let prompts: Vec<String> = [90, 260, 430, 700]
        .iter()
        .enumerate()
        .map(|(i, &n)| filler_text(300 + i as u64, n))
        .collect();
    let mut references = Vec::new();
    for p in &prompts {
        references.push(reference_greedy(&model, p, 120)?);
    }
    for (config, label) in [
        (big_budget(), "budget >= context"),
        (small_budget(), "budget 128"),
    ] {
        let fkv = load(Source::Plain(&model.dir), &Attention::freekv(config), 8).await?;
        let freekv = fkv.freekv.clone().expect("a FreeKV model");
        let generations = greedy_concurrently(fkv.model, &prompts, 120).await?;
        for (i, got) in generations.into_iter().enumerate() {
            assert_eq!(got.tokens.len(), 120, "{label}: request {i} stopped early");
            let (want, margins) = &references[i];
            let (prefix, agree) = agreement(want, &got.tokens);
            let required = robust_prefix(margins, NEAR_TIE);
            println!(
                "{label:17} request {i}: {prefix:3} leading tokens as the reference \
                 (first near-tie at {required}), {agree:.3} agreement"
            );
            // With every page resident, FreeKV is exact: the request must follow its own
            // reference path up to the first near-tie. (Any mix-up of sequences, blocks or
            // per-sequence state breaks this at once.)
            if label == "budget >= context" {
                assert!(
                    prefix >= required,
                    "request {i} left its reference path at token {prefix}, before the first \
                     near-tie at {required}: {:?} vs {:?}",
                    want.get(prefix),
                    got.tokens.get(prefix)
                );
            }
        }
        let c = freekv.counters().total;
        println!("{label}: {c:?}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_models_served_at_once_keep_their_own_state() -> anyhow::Result<()> {
    let _serial = serial();
    // Two models in one process (two FreeKV instances, two engine KV-cache managers whose
    // sequence ids overlap), decoding at the same time: each step's rows travel with that
    // step's metadata, so each request follows its own model's reference path.
    let mut models = Vec::new();
    for (i, arch) in [Arch::Llama, Arch::Qwen2].into_iter().enumerate() {
        let dir = paths::scratch(&format!("tiny-two-models-{}", arch.name()))?;
        models.push(write_tiny_model(arch, &dir, 61 + i as u64)?);
    }
    let prompts: Vec<String> = (0..2).map(|i| filler_text(700 + i, 400)).collect();
    let mut references = Vec::new();
    for (model, prompt) in models.iter().zip(&prompts) {
        references.push(reference_greedy(model, prompt, 80)?);
    }
    let mut loaded = Vec::new();
    for model in &models {
        let fkv = load(
            Source::Plain(&model.dir),
            &Attention::freekv(big_budget()),
            4,
        )
        .await?;
        loaded.push(Arc::new(fkv.model));
    }
    let handles: Vec<_> = loaded
        .iter()
        .zip(&prompts)
        .map(|(engine, prompt)| {
            let (engine, prompt) = (engine.clone(), prompt.clone());
            tokio::spawn(async move { greedy(&engine, &prompt, 80).await })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let got = h.await??;
        let (want, margins) = &references[i];
        let (prefix, _) = agreement(want, &got.tokens);
        let required = robust_prefix(margins, NEAR_TIE);
        println!(
            "model {i}: {prefix} leading tokens as its reference (first near-tie at {required})"
        );
        assert!(
            prefix >= required,
            "model {i} left its reference path at token {prefix}, before the first near-tie at \
             {required}: {:?} vs {:?}",
            want.get(prefix),
            got.tokens.get(prefix)
        );
    }
    Ok(())
}

/// Sends every prompt at once (greedy, `n` tokens each) and returns the generations in
/// prompt order.
async fn greedy_concurrently(
    model: mistralrs::Model,
    prompts: &[String],
    n: usize,
) -> anyhow::Result<Vec<Generation>> {
    let engine = Arc::new(model);
    let handles: Vec<_> = prompts
        .iter()
        .cloned()
        .map(|p| {
            let engine = engine.clone();
            tokio::spawn(async move { greedy(&engine, &p, n).await })
        })
        .collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await??);
    }
    Ok(out)
}

/// Prompts of exactly the same token count (the paged scheduler batches only equal lengths),
/// so prefill and decode run with several rows at once.
fn equal_length_prompts(
    model: &freekv_integration_tests::tiny_models::TinyModel,
    n: usize,
    tokens: usize,
) -> Vec<String> {
    let tok = model.tokenizer();
    let mut out: Vec<String> = Vec::new();
    let mut seed = 500;
    while out.len() < n {
        let p = filler_text(seed, tokens);
        seed += 1;
        let len = tok.encode(&format!("<s>user: {p}\nassistant:")).len();
        let want = out
            .first()
            .map(|f| tok.encode(&format!("<s>user: {f}\nassistant:")).len());
        if want.is_none_or(|w| w == len) {
            out.push(p);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_requests_of_equal_length_stay_on_their_own_path() -> anyhow::Result<()> {
    let _serial = serial();
    let dir = paths::scratch("tiny-batched")?;
    let model = write_tiny_model(Arch::Llama, &dir, 41)?;
    let prompts = equal_length_prompts(&model, 4, 300);
    let mut references = Vec::new();
    for p in &prompts {
        references.push(reference_greedy(&model, p, 60)?);
    }
    let fkv = load(
        Source::Plain(&model.dir),
        &Attention::freekv(big_budget()),
        8,
    )
    .await?;
    let generations = greedy_concurrently(fkv.model, &prompts, 60).await?;
    for (i, got) in generations.into_iter().enumerate() {
        let (want, margins) = &references[i];
        let (prefix, _) = agreement(want, &got.tokens);
        let required = robust_prefix(margins, NEAR_TIE);
        println!("batched request {i}: {prefix} leading tokens as the reference (first near-tie at {required})");
        assert!(
            prefix >= required,
            "batched request {i} left its reference path at token {prefix}, before the first near-tie at {required}"
        );
    }
    Ok(())
}

/// Polls `done` every `poll_ms` until it holds; fails with `failure()` after `limit_s` seconds.
async fn wait_until(
    limit_s: u64,
    poll_ms: u64,
    done: impl Fn() -> bool,
    failure: impl Fn() -> String,
) {
    let start = std::time::Instant::now();
    while !done() {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(limit_s),
            "{}",
            failure()
        );
        tokio::time::sleep(std::time::Duration::from_millis(poll_ms)).await;
    }
}

/// A long-lived SDK host loads and drops models: dropping a `Model` must free its FreeKV
/// instance (host tier, per-sequence state, worker thread).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_model_frees_its_host_tier() -> anyhow::Result<()> {
    let _serial = serial();
    let dir = paths::scratch("tiny-drop")?;
    let model = write_tiny_model(Arch::Llama, &dir, 5)?;
    let fkv = load(
        Source::Plain(&model.dir),
        &Attention::freekv(small_budget()),
        2,
    )
    .await?;
    let freekv = fkv.freekv.clone().expect("a FreeKV model");
    greedy(&fkv.model, &filler_text(9, 300), 8).await?;
    // The engine releases a finished sequence's blocks after it has sent the last response,
    // so the client may see the answer a moment before FreeKV hears of the release.
    wait_until(
        10,
        20,
        || freekv.live_sequences() == 0,
        || {
            format!(
                "a finished request left state 10 s after its answer ({} live sequences)",
                freekv.live_sequences()
            )
        },
    )
    .await;
    let weak = Arc::downgrade(&freekv);
    drop(freekv);
    drop(fkv);
    wait_until(
        30,
        100,
        || weak.strong_count() == 0,
        || {
            format!(
                "the FreeKV instance is still alive 30 s after its model was dropped ({} owners)",
                weak.strong_count()
            )
        },
    )
    .await;
    Ok(())
}
