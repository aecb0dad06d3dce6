//! FreeKV from the mistral.rs Rust SDK: the passkey task of the main job, in-process.
//!
//! ```text
//! cargo run --release --example sdk_passkey -- [--gguf PATH] [--tokens 2000] [--depth 0.3] [--budget 512]
//! ```
//!
//! Registering FreeKV before the model is built is all it takes; the rest is the SDK as usual.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use freekv_examples::passkey::{is_correct, passkey};
use freekv_plugin::FreeKvConfig;
use mistralrs::{
    GgufModelBuilder, MemoryGpuConfig, PagedAttentionMetaBuilder, RequestBuilder, TextMessageRole,
    TokenSource,
};

#[tokio::main]
async fn main() -> Result<()> {
    let mut gguf = PathBuf::from(".cache/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let (mut tokens, mut depth, mut budget) = (2000usize, 0.3f64, 512usize);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let v = args.next().with_context(|| format!("{a} needs a value"))?;
        match a.as_str() {
            "--gguf" => gguf = v.into(),
            "--tokens" => tokens = v.parse().context("--tokens")?,
            "--depth" => depth = v.parse().context("--depth")?,
            "--budget" => budget = v.parse().context("--budget")?,
            other => bail!("unknown argument {other}"),
        }
    }

    // 1. FreeKV with the long-input setting: 128 sink + 128 window + selected pages.
    let config = FreeKvConfig {
        budget,
        sink: 128,
        window: 128,
        tau: 0.8,
        ..FreeKvConfig::default()
    };
    freekv_plugin::engine::register(config.clone())?;

    // 2. The model, with paged attention on (FreeKV serves it on the CPU).
    let dir = gguf.parent().context("--gguf has no folder")?;
    let file = gguf.file_name().context("--gguf has no file name")?;
    let model = GgufModelBuilder::new(
        dir.to_string_lossy(),
        vec![file.to_string_lossy().into_owned()],
    )
    .with_token_source(TokenSource::None)
    .with_force_cpu()
    .with_paged_attn(
        PagedAttentionMetaBuilder::default()
            .with_block_size(config.page_size)
            .with_gpu_memory(MemoryGpuConfig::ContextSize(8192))
            .build()?,
    )
    .build()
    .await?;

    // 3. The task.
    let task = passkey(tokens, depth, 2026);
    let request = RequestBuilder::new()
        .add_message(TextMessageRole::User, &task.prompt)
        .set_deterministic_sampler()
        .set_sampler_max_len(16);
    let response = model.send_chat_request(request).await?;
    let answer = response.choices[0]
        .message
        .content
        .clone()
        .unwrap_or_default();
    let usage = &response.usage;
    println!(
        "prompt {} tokens ({:.1} tok/s), {} generated ({:.1} tok/s)",
        usage.prompt_tokens,
        usage.avg_prompt_tok_per_sec,
        usage.completion_tokens,
        usage.avg_compl_tok_per_sec
    );
    let ok = is_correct(&answer, &task.key);
    println!(
        "hidden key {}  answer {:?}  {}",
        task.key,
        answer.trim(),
        if ok { "correct" } else { "WRONG" }
    );

    // 4. What FreeKV did.
    for m in freekv_plugin::engine::loaded_models() {
        println!(
            "FreeKV counters: {}",
            serde_json::to_string_pretty(&m.freekv.counters().total)?
        );
    }
    if !ok {
        bail!("the answer does not hold the key");
    }
    Ok(())
}
