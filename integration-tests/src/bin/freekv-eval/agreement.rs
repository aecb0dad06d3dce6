//! Parts 2 and 3, agreement with dense and FreeKV's behaviour: a long real text (a licence
//! under /usr/share/common-licenses) is teacher forced through the engine, so every variant
//! sees the same tokens; at each forced step the next-token distribution is compared with
//! the dense path's (top-1 agreement, KL(dense || variant)). FreeKV's counters give the
//! correction rate per layer, the query-similarity distribution and recall traffic.
//!
//! The part runs with candle's `CANDLE_DEQUANTIZE_ALL=1` (set by `main`): the GGUF's Q4_1
//! weights are dequantized to f32 at load, so stock and FreeKV multiply with the same weights
//! and no activation is re-quantized (with Q4_1 matmuls the floor is ~95%: docs/results.md,
//! section 2, says why). Each comparison runs in two precisions: f32 (activations and KV cache)
//! and the engine's automatic dtype (f16 for this model on the CPU). "FreeKV dense mode"
//! (every page attended) is the floor each table's retrieval rows are read against.

use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use either::Either;
use freekv_integration_tests::engine::{load, Source};
use freekv_plugin::{LayerCounters, Selector};
use mistralrs::{CustomLogitsProcessor, DType, RequestBuilder, Tensor, TextMessageRole};
use serde::{Deserialize, Serialize};

use crate::variants::Variant;
use crate::Ctx;

/// The model's activation and KV dtype for one table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// f32 activations and KV cache: the reference whose floor is ~100%.
    F32,
    /// The engine's automatic dtype (f16 for this GGUF model on the CPU); results from before the f32 reference
    /// existed are this.
    #[default]
    Auto,
}

impl Precision {
    /// How the model file is loaded in this precision.
    fn source(self, gguf: &std::path::Path) -> Source<'_> {
        match self {
            Precision::F32 => Source::GgufF32(gguf),
            Precision::Auto => Source::Gguf(gguf),
        }
    }

    /// A table heading.
    pub fn label(self) -> &'static str {
        let dequantized = std::env::var_os("CANDLE_DEQUANTIZE_ALL").is_some();
        match (self, dequantized) {
            (Precision::F32, true) => {
                "f32 (weights dequantized from Q4_1 to f32 at load; activations and KV cache f32)"
            }
            (Precision::F32, false) => "f32 (activations and KV cache; the weights stay Q4_1)",
            (Precision::Auto, true) => {
                "the engine's automatic dtype (f16 for this model on the CPU), weights \
                 dequantized to f32 at load"
            }
            (Precision::Auto, false) => {
                "the engine's automatic dtype (f16 for this GGUF model on the CPU)"
            }
        }
    }
}

/// What to run.
pub struct Plan {
    /// One table per precision, in this order.
    pub precisions: Vec<Precision>,
    /// Tokens of the text in the prompt (prefilled densely).
    pub prompt_tokens: usize,
    /// Tokens of the text that follow, forced one decode step at a time.
    pub forced_tokens: usize,
    pub variants: Vec<Variant>,
}

impl Plan {
    pub fn new(quick: bool) -> Self {
        use freekv_plugin::Mode::*;
        if quick {
            return Self {
                precisions: vec![Precision::F32],
                prompt_tokens: 256,
                forced_tokens: 64,
                variants: vec![
                    Variant::freekv(1024, 0.9, Dense),
                    Variant::freekv(128, 0.9, FreeKv),
                ],
            };
        }
        // FREEKV_EVAL_PRECISIONS="f32" and FREEKV_EVAL_VARIANTS="b1024 t0.9,b1024 oracle"
        // narrow the plan (a partial run; the default is the whole plan).
        let precisions = match std::env::var("FREEKV_EVAL_PRECISIONS").ok().as_deref() {
            Some("f32") => vec![Precision::F32],
            Some("auto") => vec![Precision::Auto],
            _ => vec![Precision::F32, Precision::Auto],
        };
        let keep: Option<Vec<String>> = std::env::var("FREEKV_EVAL_VARIANTS")
            .ok()
            .map(|v| v.split(',').map(|x| x.trim().to_string()).collect());
        let oracle = |b| Variant::oracle(b);
        let rerank = |b| {
            Variant::freekv(b, 0.9, FreeKv).with("rerank x4", |c| {
                c.selector = Selector::Rerank;
                c.shortlist = 4;
            })
        };
        Self {
            precisions,
            prompt_tokens: 2048,
            forced_tokens: 1024,
            variants: [
                // The numerical floor: FreeKV attending over every page, no retrieval.
                Variant::freekv(1024, 0.9, Dense),
                Variant::freekv(256, 0.9, FreeKv),
                Variant::freekv(512, 0.9, FreeKv),
                Variant::freekv(1024, 0.9, FreeKv),
                Variant::freekv(2048, 0.9, FreeKv),
                Variant::freekv(512, 0.8, FreeKv),
                Variant::freekv(1024, 0.8, FreeKv),
                Variant::freekv(512, 0.9, Sync),
                Variant::freekv(512, 0.9, Speculative),
                // What the budget allows, and the rerank selector.
                oracle(512),
                oracle(1024),
                rerank(512),
                rerank(1024),
            ]
            .into_iter()
            .filter(|v| keep.as_ref().is_none_or(|k| k.contains(&v.name)))
            .collect(),
        }
    }
}

impl Plan {
    /// The settings study (f32 reference, the full run's text): at budget 512, what recovers
    /// agreement (more dense layers, smaller pages, another sink/window split, pooling,
    /// summary), and the correction-rate trade-off of fixed tau against adaptive correction.
    pub fn tuning(quick: bool) -> Self {
        use freekv_plugin::Mode::*;
        let base = || Variant::freekv(512, 0.9, FreeKv);
        let mut variants = vec![
            base(),
            base().with("dense 0-1", |c| c.dense_layers = vec![0, 1]),
            base().with("dense 0-3", |c| c.dense_layers = vec![0, 1, 2, 3]),
            base().with("page 16", |c| c.page_size = 16),
            base().with("sink/window 32", |c| {
                c.sink = 32;
                c.window = 32;
            }),
            base().with("sink/window 192", |c| {
                c.sink = 192;
                c.window = 192;
            }),
            base().with("pool mean", |c| c.pooling = freekv_plugin::Pooling::Mean),
            base().with("pool max", |c| c.pooling = freekv_plugin::Pooling::Max),
            base().with("centre-mad", |c| {
                c.summary = freekv_plugin::SummaryKind::CentreMad
            }),
        ];
        for tau in [0.5, 0.7, 0.8, 0.95] {
            variants.push(Variant::freekv(512, tau, FreeKv));
        }
        variants.push(Variant::freekv(512, 0.9, Speculative));
        variants.push(Variant::freekv(512, 0.9, Sync));
        for rate in [0.1, 0.25, 0.5, 0.75] {
            variants.push(Variant::adaptive(512, rate));
        }
        if quick {
            variants = vec![Variant::adaptive(128, 0.25)];
        }
        let full = Self::new(quick);
        Self {
            precisions: vec![Precision::F32],
            variants,
            ..full
        }
    }
}

/// One variant's agreement with dense and what FreeKV did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Outcome {
    #[serde(default)]
    pub precision: Precision,
    pub variant: String,
    pub budget: usize,
    pub tau: f32,
    /// Adaptive correction's target rate (0: fixed tau).
    #[serde(default)]
    pub correction_rate: f32,
    pub mode: freekv_plugin::Mode,
    pub steps: usize,
    pub top1_agreement: f64,
    pub mean_kl: f64,
    pub max_kl: f64,
    /// Per layer (FreeKV's counters over the whole run).
    pub per_layer: Vec<LayerCounters>,
    pub total: LayerCounters,
}

/// Where the forced tokens are and what was seen at each step.
struct Forcing {
    targets: Vec<u32>,
    prompt_len: Mutex<Option<usize>>,
    /// Dense: the recorded log-distributions; a variant: compared against `reference`.
    record: Mutex<Vec<Vec<f32>>>,
    reference: Option<Arc<Vec<Vec<f32>>>>,
    stats: Mutex<(usize, usize, f64, f64)>, // steps, top-1 agreements, KL sum, KL max
}

fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&x| ((x - max) as f64).exp()).sum();
    let lse = max as f64 + sum.ln();
    logits.iter().map(|&x| (x as f64 - lse) as f32).collect()
}

fn argmax(x: &[f32]) -> usize {
    x.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i)
}

impl CustomLogitsProcessor for Forcing {
    fn apply(&self, logits: &Tensor, context: &[u32]) -> mistralrs::Result<Tensor> {
        let step = {
            let mut p = self.prompt_len.lock().expect("forcing lock");
            context.len() - *p.get_or_insert(context.len())
        };
        let row = logits
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let lp = log_softmax(&row);
        match &self.reference {
            None => self.record.lock().expect("forcing lock").push(lp),
            Some(reference) => {
                if let Some(want) = reference.get(step) {
                    let kl: f64 = want
                        .iter()
                        .zip(&lp)
                        .map(|(&p, &q)| (p as f64).exp() * (p as f64 - q as f64))
                        .sum();
                    let mut s = self.stats.lock().expect("forcing lock");
                    s.0 += 1;
                    s.1 += (argmax(want) == argmax(&lp)) as usize;
                    s.2 += kl.max(0.0);
                    s.3 = s.3.max(kl);
                }
            }
        }
        // Force the text's next token.
        force(logits, self.targets.get(step).copied().unwrap_or(0))
    }
}

/// Logits shaped like `logits` that make `target` the only possible next token.
pub fn force(logits: &Tensor, target: u32) -> mistralrs::Result<Tensor> {
    let mut forced = vec![f32::NEG_INFINITY; logits.elem_count()];
    if let Some(x) = forced.get_mut(target as usize) {
        *x = 0.0;
    }
    Tensor::from_vec(forced, logits.shape(), logits.device())?.to_dtype(logits.dtype())
}

/// The licence text and its token ids under the model's tokenizer.
/// The smoke run (`--quick`) falls back to this repository's README where the licence is not
/// installed (a minimal container); the full run needs the licence, for comparable figures.
async fn text_tokens(model: &mistralrs::Model, quick: bool) -> Result<(String, Vec<u32>)> {
    let path = "/usr/share/common-licenses/GPL-3";
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if quick => {
            eprintln!("agreement: cannot read {path} ({e}); smoke run on README.md instead");
            let readme = concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md");
            std::fs::read_to_string(readme).with_context(|| format!("reading {readme}"))?
        }
        Err(e) => {
            return Err(e).with_context(|| {
                format!("reading {path} (Debian's base-files package installs it)")
            })
        }
    };
    let ids = model
        .tokenize(Either::Right(text.clone()), None, false, false, None)
        .await
        .context("tokenizing the text")?;
    Ok((text, ids))
}

/// Runs one variant (or dense when `reference` is None) over the text.
async fn forced_run(
    model: &mistralrs::Model,
    plan: &Plan,
    ids: &[u32],
    reference: Option<Arc<Vec<Vec<f32>>>>,
) -> Result<Arc<Forcing>> {
    let prompt_ids = &ids[..plan.prompt_tokens.min(ids.len())];
    let rest = &ids[prompt_ids.len()..];
    anyhow::ensure!(rest.len() >= plan.forced_tokens, "the text is too short");
    let prompt = model
        .detokenize(prompt_ids.to_vec(), false)
        .await
        .context("detokenizing the prompt")?;
    let forcing = Arc::new(Forcing {
        targets: rest[..plan.forced_tokens].to_vec(),
        prompt_len: Mutex::new(None),
        record: Mutex::new(Vec::new()),
        reference,
        stats: Mutex::new((0, 0, 0.0, 0.0)),
    });
    let request = RequestBuilder::new()
        .add_message(
            TextMessageRole::User,
            format!("Continue this text.\n\n{prompt}"),
        )
        .set_deterministic_sampler()
        .set_sampler_max_len(plan.forced_tokens)
        .add_logits_processor(forcing.clone());
    let response = model.send_chat_request(request).await?;
    let n = response.usage.completion_tokens;
    anyhow::ensure!(
        n == plan.forced_tokens,
        "the forced run stopped after {n} of {} tokens",
        plan.forced_tokens
    );
    Ok(forcing)
}

/// Per precision: runs dense, then every variant against it.
pub async fn run(cx: &Ctx, plan: &Plan) -> Result<Vec<Outcome>> {
    let mut out = Vec::new();
    for &precision in &plan.precisions {
        out.extend(run_in(cx, plan, precision).await?);
    }
    Ok(out)
}

async fn run_in(cx: &Ctx, plan: &Plan, precision: Precision) -> Result<Vec<Outcome>> {
    let context = plan.prompt_tokens + plan.forced_tokens + 64;
    let source = precision.source(&cx.gguf);
    let dense = load(source, &Variant::dense().attention(context), 1).await?;
    let (_, ids) = text_tokens(&dense.model, cx.quick).await?;
    eprintln!(
        "agreement ({precision:?}): {} text tokens; prompt {} + forced {}",
        ids.len(),
        plan.prompt_tokens,
        plan.forced_tokens
    );
    let t = std::time::Instant::now();
    let recorded = forced_run(&dense.model, plan, &ids, None).await?;
    let reference = Arc::new(std::mem::take(&mut *recorded.record.lock().expect("lock")));
    eprintln!("agreement: dense run {:.0} s", t.elapsed().as_secs_f64());
    drop(dense);
    let mut out = Vec::new();
    for v in &plan.variants {
        let t = std::time::Instant::now();
        let loaded = load(source, &v.attention(context), 1).await?;
        let forcing = forced_run(&loaded.model, plan, &ids, Some(reference.clone())).await?;
        let (steps, agree, kl_sum, kl_max) = *forcing.stats.lock().expect("lock");
        let counters = loaded
            .freekv
            .as_ref()
            .context("FreeKV instance")?
            .counters();
        let config = v.config.as_ref().context("FreeKV variant")?;
        let o = Outcome {
            precision,
            variant: v.name.clone(),
            budget: config.budget,
            tau: config.tau,
            correction_rate: config.correction_rate,
            mode: config.mode,
            steps,
            top1_agreement: agree as f64 / steps.max(1) as f64,
            mean_kl: kl_sum / steps.max(1) as f64,
            max_kl: kl_max,
            per_layer: counters.per_layer,
            total: counters.total,
        };
        eprintln!(
            "agreement {precision:?} {:<12} top-1 {:.4} mean KL {:.5} ({} steps, correction rate {:.3}, {:.0} s)",
            o.variant,
            o.top1_agreement,
            o.mean_kl,
            o.steps,
            o.total.correction_rate(),
            t.elapsed().as_secs_f64()
        );
        out.push(o);
    }
    Ok(out)
}

/// Markdown: agreement and behaviour per variant, one table per precision.
pub fn tables(outcomes: &[Outcome]) -> String {
    let mut precisions: Vec<Precision> = outcomes.iter().map(|o| o.precision).collect();
    precisions.dedup();
    let mut s = String::new();
    for p in precisions {
        s += &format!("Model in {}:\n\n", p.label());
        let of: Vec<Outcome> = outcomes
            .iter()
            .filter(|o| o.precision == p)
            .cloned()
            .collect();
        s += &table(&of);
        s += "\n";
    }
    s
}

/// Markdown: agreement and behaviour per variant.
fn table(outcomes: &[Outcome]) -> String {
    let mut s = String::from(
        "| variant | top-1 agreement | mean KL | max KL | correction rate | mean query cosine | \
         pages recalled per layer-step | blocking selections |\n|---|---|---|---|---|---|---|---|\n",
    );
    for o in outcomes {
        let t = &o.total;
        let steps = t.decode_steps.max(1) as f64;
        s += &format!(
            "| {} | {:.2}% | {:.4} | {:.3} | {:.3} | {} | {:.2} | {} |\n",
            o.variant,
            100.0 * o.top1_agreement,
            o.mean_kl,
            o.max_kl,
            t.correction_rate(),
            t.mean_similarity()
                .map_or("-".to_string(), |m| format!("{m:.3}")),
            t.pages_recalled as f64 / steps,
            t.blocking_selections
        );
    }
    s
}

/// Markdown: the distribution of the query similarity of one variant (FreeKV mode).
pub fn similarity_table(o: &Outcome) -> String {
    let h = &o.total.similarity_histogram;
    let n: u64 = h.iter().sum::<u64>().max(1);
    let width = 2.0 / h.len() as f64;
    let mut s = format!(
        "Query cosine (step i vs i-1, mean over the group) for {}: {} head-steps\n\n\
         | bin | share |\n|---|---|\n",
        o.variant, n
    );
    for (b, &c) in h.iter().enumerate() {
        if c > 0 {
            let lo = -1.0 + b as f64 * width;
            s += &format!(
                "| [{lo:.1}, {:.1}) | {:.2}% |\n",
                lo + width,
                100.0 * c as f64 / n as f64
            );
        }
    }
    s
}

/// The outcomes of the reference precision (f32 when it ran) for the charts.
fn headline(outcomes: &[Outcome]) -> impl Iterator<Item = &Outcome> {
    let p = outcomes
        .iter()
        .map(|o| o.precision)
        .min_by_key(|p| *p as u8)
        .unwrap_or_default();
    outcomes.iter().filter(move |o| o.precision == p)
}

/// Correction rate per layer, one series per FreeKV-mode variant.
pub fn correction_chart(outcomes: &[Outcome]) -> crate::plot::Chart<'static> {
    let series = headline(outcomes)
        .filter(|o| o.total.heads_checked > 0)
        .map(|o| crate::plot::Series {
            label: o.variant.clone(),
            points: o
                .per_layer
                .iter()
                .enumerate()
                .filter(|(_, l)| l.heads_checked > 0)
                .map(|(i, l)| (i as f64, l.correction_rate()))
                .collect(),
        })
        .collect();
    crate::plot::Chart {
        title: "FreeKV correction rate by layer (teacher-forced licence text)",
        x_label: "layer",
        y_label: "corrected heads / checked heads",
        y_range: None,
        x_named: None,
        log2_x: false,
        series,
    }
}

/// Top-1 agreement vs budget, one series per tau.
pub fn agreement_chart(outcomes: &[Outcome]) -> crate::plot::Chart<'static> {
    let outcomes: Vec<&Outcome> = headline(outcomes).collect();
    let mut taus: Vec<f32> = outcomes
        .iter()
        .filter(|o| o.total.heads_checked > 0)
        .map(|o| o.tau)
        .collect();
    taus.sort_by(f32::total_cmp);
    taus.dedup();
    let series = taus
        .iter()
        .map(|&tau| crate::plot::Series {
            label: format!("FreeKV tau {tau}"),
            points: outcomes
                .iter()
                .filter(|o| o.tau == tau && o.total.heads_checked > 0)
                .map(|o| (o.budget as f64, o.top1_agreement))
                .collect(),
        })
        .collect();
    crate::plot::Chart {
        title: "Top-1 agreement with dense vs budget",
        x_named: None,
        x_label: "budget (tokens, log scale)",
        y_label: "top-1 agreement",
        y_range: None,
        log2_x: true,
        series,
    }
}

/// Mean KL vs correction rate at one budget: fixed tau (sync and speculative at the ends)
/// against adaptive correction.
pub fn correction_chart_kl(outcomes: &[Outcome]) -> crate::plot::Chart<'static> {
    let rate = |o: &Outcome| match o.mode {
        freekv_plugin::Mode::Sync => 1.0,
        _ => o.total.correction_rate(),
    };
    // "b512 t0.8", "b512 sync", "b512 spec": no setting changed.
    let plain = |o: &&Outcome| o.variant.split(' ').count() == 2;
    let mut fixed: Vec<(f64, f64)> = outcomes
        .iter()
        .filter(plain)
        .filter(|o| o.correction_rate == 0.0 && o.mode != freekv_plugin::Mode::Dense)
        .map(|o| (rate(o), o.mean_kl))
        .collect();
    let mut adaptive: Vec<(f64, f64)> = outcomes
        .iter()
        .filter(|o| o.correction_rate > 0.0)
        .map(|o| (rate(o), o.mean_kl))
        .collect();
    fixed.sort_by(|a, b| a.0.total_cmp(&b.0));
    adaptive.sort_by(|a, b| a.0.total_cmp(&b.0));
    crate::plot::Chart {
        title: "Mean KL vs correction rate (budget 512)",
        x_named: None,
        x_label: "share of KV heads corrected per step",
        y_label: "mean KL(dense || FreeKV)",
        y_range: None,
        log2_x: false,
        series: vec![
            crate::plot::Series {
                label: "fixed tau (speculative .. sync)".into(),
                points: fixed,
            },
            crate::plot::Series {
                label: "adaptive (target rate)".into(),
                points: adaptive,
            },
        ],
    }
}
