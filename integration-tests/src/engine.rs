//! Drives mistral.rs in-process through its Rust SDK, stock or with FreeKV, and collects
//! greedy generations token by token.
//!
//! FreeKV's configuration is process-wide state read when a model loads, so loads are
//! serialised ([`load`] holds a lock across "configure, then build").

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use freekv_plugin::{FreeKv, FreeKvConfig};
use mistralrs::{
    GgufModelBuilder, MemoryGpuConfig, Model, ModelDType, PagedAttentionMetaBuilder,
    RequestBuilder, TextMessageRole, TextModelBuilder, TokenSource,
};
use tokio::sync::Mutex;

/// Which attention path a model runs.
#[derive(Debug, Clone)]
pub enum Attention {
    /// The engine's own eager path (no paged attention).
    Stock,
    /// Paged attention served by FreeKV with this configuration; the host tier holds
    /// `context_tokens` tokens of KV (the engine's `--pa-context-len`).
    FreeKv {
        config: FreeKvConfig,
        context_tokens: usize,
    },
}

impl Attention {
    /// FreeKV with `config` and room for 8,192 tokens.
    pub fn freekv(config: FreeKvConfig) -> Self {
        Self::FreeKv {
            config,
            context_tokens: 8192,
        }
    }
}

/// Where the model comes from.
#[derive(Debug, Clone, Copy)]
pub enum Source<'a> {
    /// A Hugging Face-style directory (config.json, safetensors, tokenizer.json), run in f32.
    Plain(&'a Path),
    /// A GGUF file (tokenizer and chat template inside), run in the engine's automatic dtype
    /// (f16 for this GGUF model on the CPU: its activations and KV cache).
    Gguf(&'a Path),
    /// A GGUF file run with f32 activations and KV cache (the weights stay quantized): a
    /// reference whose arithmetic FreeKV's f32 sums do not round differently from.
    GgufF32(&'a Path),
}

/// A loaded model and, with FreeKV, the instance serving it.
pub struct Loaded {
    pub model: Model,
    pub freekv: Option<Arc<FreeKv>>,
}

static LOAD_LOCK: Mutex<()> = Mutex::const_new(());

/// Loads a model on the CPU with the given attention path.
pub async fn load(source: Source<'_>, attention: &Attention, max_seqs: usize) -> Result<Loaded> {
    let _guard = LOAD_LOCK.lock().await;
    // The engine's logs (and FreeKV's, filtered by RUST_LOG) when asked for.
    if std::env::var_os("FREEKV_TEST_LOG").is_some() {
        mistralrs::initialize_logging();
    }
    let paged = match attention {
        Attention::Stock => None,
        Attention::FreeKv {
            config,
            context_tokens,
        } => {
            freekv_plugin::engine::register(config.clone())?;
            Some(
                PagedAttentionMetaBuilder::default()
                    .with_block_size(config.page_size)
                    .with_gpu_memory(MemoryGpuConfig::ContextSize(*context_tokens))
                    .build()?,
            )
        }
    };
    let before: Vec<usize> = freekv_plugin::engine::loaded_models()
        .iter()
        .map(|m| m.index)
        .collect();
    let model = match source {
        Source::Plain(dir) => {
            let mut b = TextModelBuilder::new(dir.to_string_lossy())
                .with_dtype(ModelDType::F32)
                .with_token_source(TokenSource::None)
                .with_force_cpu()
                .with_max_num_seqs(max_seqs);
            if let Some(p) = paged {
                b = b.with_paged_attn(p);
            }
            b.build().await
        }
        Source::GgufF32(file) => gguf_f32(file, paged, max_seqs).await,
        Source::Gguf(file) => {
            let dir = file.parent().context("GGUF path has no folder")?;
            let name = file.file_name().context("GGUF path has no file name")?;
            let mut b = GgufModelBuilder::new(
                dir.to_string_lossy(),
                vec![name.to_string_lossy().into_owned()],
            )
            .with_token_source(TokenSource::None)
            .with_force_cpu()
            .with_max_num_seqs(max_seqs);
            if let Some(p) = paged {
                b = b.with_paged_attn(p);
            }
            b.build().await
        }
    }
    .context("model load")?;
    let models = freekv_plugin::engine::loaded_models();
    let freekv = match attention {
        Attention::Stock => None,
        Attention::FreeKv { .. } => {
            let new = models.iter().find(|m| !before.contains(&m.index));
            anyhow::ensure!(
                new.is_some(),
                "the model loaded without FreeKV (paged attention was not enabled)"
            );
            new.map(|m| m.freekv.clone())
        }
    };
    Ok(Loaded { model, freekv })
}

/// A GGUF model in f32: the SDK's `GgufModelBuilder` always loads in the automatic dtype, so
/// this builds the same pipeline through the engine's loader with `ModelDType::F32`.
async fn gguf_f32(
    file: &Path,
    paged: Option<mistralrs::PagedAttentionConfig>,
    max_seqs: usize,
) -> Result<Model> {
    use mistralrs::core::{
        AddModelConfig, AutoDeviceMapParams, DefaultSchedulerMethod, DeviceMapSetting,
        EngineConfig, GGUFLoaderBuilder, GGUFSpecificConfig, SchedulerConfig,
    };
    let dir = file.parent().context("GGUF path has no folder")?;
    let name = file.file_name().context("GGUF path has no file name")?;
    let loader = GGUFLoaderBuilder::new(
        None,
        None,
        dir.to_string_lossy().into_owned(),
        vec![name.to_string_lossy().into_owned()],
        GGUFSpecificConfig { topology: None },
        false,
        None,
    )
    .build();
    let pipeline = loader.load_model_from_hf(
        None,
        TokenSource::None,
        &ModelDType::F32,
        &mistralrs::Device::Cpu,
        true,
        DeviceMapSetting::Auto(AutoDeviceMapParams::default_text()),
        None,
        paged,
    )?;
    let cache = pipeline.lock().await.get_metadata().cache_config.clone();
    let scheduler = match (paged.is_some(), cache) {
        (true, Some(config)) => SchedulerConfig::PagedAttentionMeta {
            max_num_seqs: max_seqs,
            config,
        },
        _ => SchedulerConfig::DefaultScheduler {
            method: DefaultSchedulerMethod::Fixed(max_seqs.try_into()?),
        },
    };
    // As the SDK's builders default: no throughput log lines, prefix caching on.
    let engine = EngineConfig {
        throughput_logging_enabled: false,
        ..EngineConfig::default()
    };
    let add = AddModelConfig {
        engine_config: engine,
        mcp_client_config: None,
        loader_config: None,
    };
    Ok(mistralrs::model_builder_trait::build_model_from_pipeline(pipeline, scheduler, add).await)
}

/// A greedy generation: the tokens as the engine reports them, the text, and what the model
/// scored at each step.
#[derive(Debug, Clone)]
pub struct Generation {
    pub tokens: Vec<String>,
    /// Each step's highest raw logit (the chosen token's, under greedy decoding).
    pub logits: Vec<f32>,
    /// Each step's top-1 minus top-2 raw logit margin.
    pub margins: Vec<f32>,
    /// Each step's runner-up token id (second-highest logit).
    pub runner_up: Vec<u32>,
    /// Each step's chosen token id.
    pub ids: Vec<u32>,
    pub text: String,
    pub finish_reason: String,
    /// Prompt length in tokens (after the chat template).
    pub prompt_tokens: usize,
}

/// One decoding step's two best raw logits, as a logits processor saw them.
#[derive(Debug, Clone, Copy)]
struct Scored {
    best: (u32, f32),
    second: (u32, f32),
}

/// A logits processor that changes nothing and records each step's top two logits. The
/// engine's own top-logprob report cannot serve here: the deterministic preset samples with
/// `top_k = 1`, which zeroes every probability but the winner's before the report is made.
#[derive(Default)]
struct TopTwo(std::sync::Mutex<Vec<Scored>>);

impl mistralrs::CustomLogitsProcessor for TopTwo {
    fn apply(
        &self,
        logits: &mistralrs::Tensor,
        _context: &[u32],
    ) -> mistralrs::Result<mistralrs::Tensor> {
        let row = logits
            .to_dtype(mistralrs::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let mut best = (0u32, f32::NEG_INFINITY);
        let mut second = (0u32, f32::NEG_INFINITY);
        for (i, &x) in row.iter().enumerate() {
            if x > best.1 {
                second = best;
                best = (i as u32, x);
            } else if x > second.1 {
                second = (i as u32, x);
            }
        }
        self.0
            .lock()
            .expect("TopTwo lock")
            .push(Scored { best, second });
        Ok(logits.clone())
    }
}

/// Greedy decoding of up to `max_tokens` tokens after the chat prompt `prompt`.
pub async fn greedy(model: &Model, prompt: &str, max_tokens: usize) -> Result<Generation> {
    let scores = Arc::new(TopTwo::default());
    let request = RequestBuilder::new()
        .add_message(TextMessageRole::User, prompt)
        .set_deterministic_sampler()
        .set_sampler_max_len(max_tokens)
        .add_logits_processor(scores.clone())
        .return_logprobs(true);
    let response = model.send_chat_request(request).await?;
    let prompt_tokens = response.usage.prompt_tokens;
    let choice = response
        .choices
        .into_iter()
        .next()
        .context("response without choices")?;
    let tokens: Vec<String> = choice
        .logprobs
        .and_then(|l| l.content)
        .unwrap_or_default()
        .into_iter()
        .map(|l| l.token)
        .collect();
    let scored = scores.0.lock().expect("TopTwo lock").clone();
    anyhow::ensure!(
        scored.len() == tokens.len(),
        "{} tokens but {} scored steps",
        tokens.len(),
        scored.len()
    );
    Ok(Generation {
        tokens,
        logits: scored.iter().map(|s| s.best.1).collect(),
        margins: scored.iter().map(|s| s.best.1 - s.second.1).collect(),
        runner_up: scored.iter().map(|s| s.second.0).collect(),
        ids: scored.iter().map(|s| s.best.0).collect(),
        text: choice.message.content.unwrap_or_default(),
        finish_reason: choice.finish_reason,
        prompt_tokens,
    })
}

/// How many leading tokens two generations share, and the fraction of positions that agree.
pub fn agreement(a: &[String], b: &[String]) -> (usize, f64) {
    let prefix = a.iter().zip(b).take_while(|(x, y)| x == y).count();
    let n = a.len().max(b.len()).max(1);
    let same = a.iter().zip(b).filter(|(x, y)| x == y).count();
    (prefix, same as f64 / n as f64)
}

/// The naive f32 reference's greedy continuation of the chat prompt `prompt` on a tiny model:
/// the tokens (as the engine spells them) and each token's top-1 minus top-2 logit margin.
pub fn reference_greedy(
    model: &crate::tiny_models::TinyModel,
    prompt: &str,
    n: usize,
) -> Result<(Vec<String>, Vec<f32>)> {
    use crate::tiny_models::reference::{greedy, Reference};
    let tok = model.tokenizer();
    let rendered = format!("<s>user: {prompt}\nassistant:");
    let mut r = Reference::load(model.spec(), &model.dir)?;
    let run = greedy(&mut r, &tok.encode(&rendered), n)?;
    let tokens = run
        .tokens
        .iter()
        .map(|&t| tok.decode(&[t], false))
        .collect();
    Ok((tokens, run.margins))
}

/// How many leading tokens must agree with a reference whose margins are `margins`: up to and
/// including the first near-tie (margin below `eps`), after which float-rounding differences
/// (batching, summation order) may legitimately pick the other token.
pub fn robust_prefix(margins: &[f32], eps: f32) -> usize {
    margins
        .iter()
        .position(|&m| m < eps)
        .map_or(margins.len(), |i| i + 1)
}
