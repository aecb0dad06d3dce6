//! The real model, SmolLM2-135M-Instruct (GGUF Q4_1), stock vs FreeKV.

use freekv_examples::passkey::passkey;
use freekv_integration_tests::engine::{agreement, greedy, load, Attention, Source};
use freekv_integration_tests::{paths, serial};
use freekv_plugin::FreeKvConfig;

/// Tokens generated in the stock-equality test: a few hundred.
const LONG: usize = 256;

/// How far apart stock's and FreeKV's logits may be. Both run the model in f16, but stock
/// multiplies attention with f16 matmuls and FreeKV sums in f32 (in prefill and decode), so
/// logits differ by rounding: measured up to 0.42 (typically 0.1-0.3, the first token's 0.24)
/// over the shared steps, not growing with the step. So: the chosen logits may differ by this
/// much while the paths agree, and the paths may part only where stock's top-2 margin is below
/// it, with FreeKV taking stock's runner-up.
const LOGIT_TOLERANCE: f32 = 1.0;

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
    let drift = want
        .logits
        .iter()
        .zip(&got.logits)
        .take(prefix)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    println!(
        "SmolLM2 budget >= context: {prefix}/{} identical leading tokens ({agree:.3}); largest \
         logit difference over the shared prefix {drift:.4}",
        want.tokens.len()
    );
    println!("stock:  {:?}\nFreeKV: {:?}", want.text, got.text);
    let diffs: Vec<String> = want
        .logits
        .iter()
        .zip(&got.logits)
        .zip(&want.margins)
        .take(prefix + 1)
        .map(|((a, b), m)| format!("{:+.3}/{m:.2}", b - a))
        .collect();
    println!(
        "logit difference (FreeKV - stock) / stock margin: {}",
        diffs.join(" ")
    );
    assert!(
        want.tokens.len() > 32,
        "stock generated too little to compare"
    );
    assert!(
        want.margins.iter().any(|&m| m > 1.0),
        "no margin above one logit: the logits processor saw no real logits ({:?})",
        &want.margins[..8]
    );
    assert!(
        (got.logits[0] - want.logits[0]).abs() <= LOGIT_TOLERANCE,
        "the first token's logits differ ({} vs {}): FreeKV's prefill attention is not the stock one",
        got.logits[0],
        want.logits[0]
    );
    assert!(
        drift <= LOGIT_TOLERANCE,
        "chosen-token logits differ by up to {drift} while the paths agree"
    );
    if prefix < want.tokens.len() {
        // They may part only at a near-tie of stock's, onto stock's runner-up.
        assert!(
            want.margins[prefix] < LOGIT_TOLERANCE,
            "FreeKV parts from stock at token {prefix}, where stock's margin is {} logits",
            want.margins[prefix]
        );
        assert_eq!(
            got.ids.get(prefix),
            Some(&want.runner_up[prefix]),
            "at token {prefix} FreeKV took neither stock's choice nor its runner-up"
        );
    } else {
        assert_eq!(got.tokens.len(), want.tokens.len());
    }
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

/// `mistralrs bench --depth N` (our CLI patch) times decode after an N-token context, with
/// FreeKV on a sparse budget: the row names the depth and holds a positive rate.
#[test]
fn bench_times_decode_at_depth() -> anyhow::Result<()> {
    use anyhow::Context;
    let _serial = serial();
    let gguf = paths::smollm2_gguf()?;
    let out = std::process::Command::new(paths::mistralrs_bin()?)
        .args(["--token-source", "none"])
        .args(freekv_integration_tests::load::FREEKV_B128)
        .args(["bench", "--format", "gguf", "-m"])
        .arg(gguf.parent().context("model folder")?)
        .arg("-f")
        .arg(gguf.file_name().context("model file")?)
        .args(["--cpu", "--paged-attn", "on", "--pa-context-len", "1024"])
        .args(["--prompt-len", "0", "--gen-len", "8", "--depth", "300"])
        .args(["--iterations", "1", "--warmup", "0"])
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    anyhow::ensure!(out.status.success(), "bench failed: {text}");
    let row = text
        .lines()
        .find(|l| l.contains("Decode (8 tokens at depth 300)"))
        .with_context(|| format!("no decode-at-depth row in: {text}"))?;
    let cells: Vec<&str> = row
        .split(['│', '┆'])
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect();
    let rate: f64 = cells
        .get(1)
        .and_then(|c| c.split_whitespace().next())
        .context("no rate cell")?
        .parse()?;
    assert!(rate > 0.0, "{row}");
    Ok(())
}
