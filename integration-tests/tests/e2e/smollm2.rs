//! The real model, SmolLM2-135M-Instruct (GGUF Q4_1), stock vs FreeKV.

use freekv_examples::passkey::passkey;
use freekv_integration_tests::engine::{agreement, greedy, load, Attention, Source};
use freekv_integration_tests::{paths, serial};
use freekv_plugin::FreeKvConfig;

/// Tokens generated in the stock-equality test: a few hundred.
const LONG: usize = 256;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budget_above_context_gives_the_stock_tokens() -> anyhow::Result<()> {
    let _serial = serial();
    let gguf = paths::smollm2_gguf()?;
    // ~500 tokens over pages of 32 (16 pages), then 256 generated tokens: all inside a
    // 1,024-token budget.
    let prompt = format!(
        "{}\n\nNow forget the pass key and write a long story about a lighthouse keeper \
         who finds a map.",
        passkey(450, 0.5, 7).prompt
    );
    let stock = load(Source::Gguf(&gguf), &Attention::Stock, 2).await?;
    let want = greedy(&stock.model, &prompt, LONG).await?;
    drop(stock);
    let config = FreeKvConfig {
        budget: 1024,
        sink: 128,
        window: 128,
        ..FreeKvConfig::default()
    };
    let fkv = load(Source::Gguf(&gguf), &Attention::freekv(config), 2).await?;
    let got = greedy(&fkv.model, &prompt, LONG).await?;
    let (prefix, agree) = agreement(&want.tokens, &got.tokens);
    println!(
        "SmolLM2 budget >= context: {prefix}/{} identical leading tokens ({agree:.3})",
        want.tokens.len()
    );
    println!("stock:  {:?}\nFreeKV: {:?}", want.text, got.text);
    assert!(!want.tokens.is_empty());
    assert_eq!(
        prefix,
        want.tokens.len(),
        "FreeKV diverges from stock at token {prefix}"
    );
    assert_eq!(got.tokens.len(), want.tokens.len());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_budget_completes_and_reports_agreement() -> anyhow::Result<()> {
    let _serial = serial();
    let gguf = paths::smollm2_gguf()?;
    let task = passkey(1000, 0.4, 8);
    let prompt = format!(
        "{}\n\nThen write a long story about a pass key that opens a secret door.",
        task.prompt
    );
    let stock = load(Source::Gguf(&gguf), &Attention::Stock, 2).await?;
    let want = greedy(&stock.model, &prompt, LONG).await?;
    drop(stock);
    // 256 tokens of a ~1,000-token context: 64 sink + 64 window + 4 pages of 32.
    let config = FreeKvConfig {
        budget: 256,
        sink: 64,
        window: 64,
        tau: 0.8,
        ..FreeKvConfig::default()
    };
    let fkv = load(Source::Gguf(&gguf), &Attention::freekv(config), 2).await?;
    let got = greedy(&fkv.model, &prompt, LONG).await?;
    let c = fkv
        .freekv
        .as_ref()
        .expect("FreeKV instance")
        .counters()
        .total;
    let (prefix, agree) = agreement(&want.tokens, &got.tokens);
    println!(
        "SmolLM2 budget 256 of ~1000: {prefix} identical leading tokens, {agree:.3} agreement; \
         key {} stock {:?} FreeKV {:?}; {} sparse steps, correction rate {:.3}",
        task.key,
        want.text,
        got.text,
        c.sparse_steps,
        c.correction_rate()
    );
    assert!(
        got.tokens.len() >= want.tokens.len().min(LONG / 2),
        "FreeKV stopped after {} tokens",
        got.tokens.len()
    );
    assert!(c.sparse_steps > 0, "the 256-token budget never went sparse");
    Ok(())
}
