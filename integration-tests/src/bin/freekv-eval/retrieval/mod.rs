//! RULER-style retrieval with the question decoded by the sparse path: a haystack of real prose
//! (the licence texts under /usr/share/common-licenses) with "needles" hidden in it is the
//! prompt (prefilled densely); the question is then fed one decode step at a time (teacher
//! forced through the engine, as Quest, ShadowKV and RetroInfer evaluate), and only then is the
//! answer generated. Every query of the question and the answer attends through the policy's
//! retrieval, so the answer is right only if the needle's pages were selected.
//!
//! Paired and fast: per prompt length, one model is loaded with FreeKV at a budget of 1/8 of
//! the context, and each trial's prompt is sent once per policy ([`Arm`]: FreeKV's dense mode,
//! the oracle at the budget, today's selector, ...), switched between requests
//! (`AnyInstance::set_policy`). The first request prefills the prompt; the engine's prefix
//! cache serves it to the others, which only decode. Every policy thus answers the same cases
//! from the same prefilled KV.
//!
//! Failing trials of a selector whose oracle succeeded can be re-run with the selection probe
//! watching the asked needle's pages ([`trace`]): per step, in how many (layer, KV head) pairs
//! the needle was attended and its rank under the selector and the oracle.

pub mod cases;
mod report;
mod trace;

use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use either::Either;
use freekv_integration_tests::engine::{load, Attention, Source};
use freekv_integration_tests::prose::Prose;
use freekv_plugin::{FreeKv, FreeKvConfig, Mode, Policy, Selector};
use mistralrs::core::{
    Constraint, NormalRequest, Request, RequestMessage, Response, SamplingParams,
};
use mistralrs::{CustomLogitsProcessor, Tensor};
use serde::{Deserialize, Serialize};

pub use cases::Task;
pub use report::{chart, table, traces};
pub use trace::NeedleTrace;

use crate::Ctx;

/// One policy under test, by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arm {
    pub name: &'static str,
    pub policy: Policy,
}

const fn arm(name: &'static str, mode: Mode, selector: Selector, shortlist: usize) -> Arm {
    Arm {
        name,
        policy: Policy {
            mode,
            selector,
            shortlist,
        },
    }
}

impl Arm {
    /// Every arm: FreeKV's dense mode (the dense reference), the oracle at the budget (select
    /// by exact attention mass with the current query), today's selector and the rerank
    /// selector (full FreeKV, tau 0.9; shortlists of 4, the default, 2 and 8), and the same
    /// with and without speculation. The default plan runs the first four; `FREEKV_EVAL_ARMS`
    /// names others.
    pub const ALL: [Arm; 10] = [
        arm("dense", Mode::Dense, Selector::Quest, 2),
        arm("oracle", Mode::Sync, Selector::Oracle, 2),
        arm("quest", Mode::FreeKv, Selector::Quest, 2),
        arm("rerank x4", Mode::FreeKv, Selector::Rerank, 4),
        arm("rerank x2", Mode::FreeKv, Selector::Rerank, 2),
        arm("rerank x8", Mode::FreeKv, Selector::Rerank, 8),
        // Speculation apart from selection: the oracle speculating, the selectors in sync.
        arm("oracle freekv", Mode::FreeKv, Selector::Oracle, 2),
        arm("quest sync", Mode::Sync, Selector::Quest, 2),
        arm("rerank x2 sync", Mode::Sync, Selector::Rerank, 2),
        arm("rerank x8 sync", Mode::Sync, Selector::Rerank, 8),
    ];
}

/// What to run.
pub struct Plan {
    pub tasks: Vec<Task>,
    /// (target prompt tokens, budget) per cell.
    pub cells: Vec<(usize, usize)>,
    pub trials: usize,
    pub arms: Vec<Arm>,
    /// Failing trials traced per cell and arm (a selector that missed where the oracle found
    /// the needle).
    pub traces: usize,
    /// Sink and window tokens (None: a quarter of the budget each, at most 128 tokens).
    pub edges: Option<(usize, usize)>,
}

/// A list from the environment (`FREEKV_EVAL_*`), comma separated.
fn env_list(name: &str) -> Option<Vec<String>> {
    std::env::var(name)
        .ok()
        .map(|v| v.split(',').map(|x| x.trim().to_string()).collect())
}

impl Plan {
    pub fn new(quick: bool) -> Self {
        if quick {
            return Self {
                tasks: vec![Task::SingleKey, Task::MultiKey],
                cells: vec![(400, 128)],
                trials: 1,
                arms: Arm::ALL[..4].to_vec(),
                traces: 1,
                edges: None,
            };
        }
        // FREEKV_EVAL_LENGTHS="2048,4096", FREEKV_EVAL_TRIALS=20, FREEKV_EVAL_ARMS="dense,oracle",
        // FREEKV_EVAL_TASKS="single,multi-key" narrow the default plan; budgets are 1/8 of each
        // length, rounded up to 128 tokens (256, 512, 1024), unless FREEKV_EVAL_BUDGETS gives
        // one per length.
        let lengths: Vec<usize> = env_list("FREEKV_EVAL_LENGTHS")
            .map(|v| v.iter().filter_map(|x| x.parse().ok()).collect())
            .unwrap_or_else(|| vec![2048, 4096, 7500]);
        let budgets: Option<Vec<usize>> = env_list("FREEKV_EVAL_BUDGETS")
            .map(|v| v.iter().filter_map(|x| x.parse().ok()).collect());
        let cells = lengths
            .iter()
            .enumerate()
            .map(|(i, &l)| {
                let b = budgets
                    .as_ref()
                    .and_then(|b| b.get(i).copied())
                    .unwrap_or_else(|| (l / 8).div_ceil(128) * 128);
                (l, b)
            })
            .collect();
        let trials = std::env::var("FREEKV_EVAL_TRIALS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(20);
        let arms = env_list("FREEKV_EVAL_ARMS");
        let tasks = env_list("FREEKV_EVAL_TASKS");
        Self {
            tasks: Task::ALL
                .into_iter()
                .filter(|t| match &tasks {
                    Some(k) => k.iter().any(|k| t.name().starts_with(k.as_str())),
                    None => matches!(t, Task::SingleKey | Task::MultiKey),
                })
                .collect(),
            cells,
            trials,
            arms: Arm::ALL
                .into_iter()
                .enumerate()
                .filter(|(i, a)| match &arms {
                    Some(k) => k.iter().any(|k| k == a.name),
                    None => *i < 4,
                })
                .map(|(_, a)| a)
                .collect(),
            // FREEKV_EVAL_TRACES=1: failing trials traced per cell and arm.
            traces: std::env::var("FREEKV_EVAL_TRACES")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(3),
            // FREEKV_EVAL_EDGES="32,64": sink and window tokens.
            edges: env_list("FREEKV_EVAL_EDGES").and_then(|v| match v[..] {
                [ref s, ref w] => Some((s.parse().ok()?, w.parse().ok()?)),
                _ => None,
            }),
        }
    }
}

/// One trial of one arm.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Trial {
    pub task: Task,
    /// The arm's name.
    pub variant: String,
    pub budget: Option<usize>,
    pub target_tokens: usize,
    pub trial: usize,
    pub prompt_tokens: usize,
    pub question_tokens: usize,
    /// Depth of the asked needle (of the first value, for multi-value) in the haystack.
    pub depth: f64,
    /// The asked needle's first and last token in the prompt.
    #[serde(default)]
    pub needle_tokens: (usize, usize),
    pub expected: Vec<String>,
    pub answer: String,
    /// Expected values found in the answer.
    pub found: usize,
    /// Every expected value found.
    pub correct: bool,
    pub sparse_steps: u64,
    pub correction_rate: f64,
    /// Wall time of the request (the first arm's includes the prefill).
    #[serde(default)]
    pub seconds: f64,
}

/// Forces the question's tokens, one decode step each, then leaves the logits alone.
struct Forcing {
    forced: Vec<u32>,
    prompt_len: Mutex<Option<usize>>,
}

impl CustomLogitsProcessor for Forcing {
    fn apply(&self, logits: &Tensor, context: &[u32]) -> mistralrs::Result<Tensor> {
        let step = {
            let mut p = self.prompt_len.lock().expect("forcing lock");
            context.len() - *p.get_or_insert(context.len())
        };
        match self.forced.get(step) {
            Some(&target) => crate::agreement::force(logits, target),
            None => Ok(logits.clone()),
        }
    }
}

/// A raw completion of `prompt` token ids: `forced` tokens teacher forced, then up to
/// `answer_tokens` greedy ones. Returns the text generated after the forced tokens.
pub async fn complete(
    model: &mistralrs::Model,
    prompt: Vec<u32>,
    forced: Vec<u32>,
    answer_tokens: usize,
) -> Result<String> {
    let n_forced = forced.len();
    let forcing = Arc::new(Forcing {
        forced: forced.clone(),
        prompt_len: Mutex::new(None),
    });
    let mut sampling = SamplingParams::deterministic();
    sampling.max_len = Some(n_forced + answer_tokens);
    let (tx, mut rx) = tokio::sync::mpsc::channel(1);
    let request = Request::Normal(Box::new(NormalRequest {
        messages: RequestMessage::CompletionTokens(prompt),
        sampling_params: sampling,
        response: tx,
        return_logprobs: false,
        is_streaming: false,
        id: 0,
        constraint: Constraint::None,
        suffix: None,
        tools: None,
        tool_choice: None,
        logits_processors: Some(vec![forcing]),
        return_raw_logits: false,
        web_search_options: None,
        model_id: None,
        truncate_sequence: false,
    }));
    model
        .inner()
        .get_sender(None)?
        .send(request)
        .await
        .context("sending the completion request")?;
    let text = match rx.recv().await.context("the engine dropped the request")? {
        Response::CompletionDone(r) => r
            .choices
            .into_iter()
            .next()
            .map(|c| c.text)
            .unwrap_or_default(),
        Response::InternalError(e) | Response::ValidationError(e) => bail!("engine error: {e}"),
        Response::CompletionModelError(e, _) => bail!("model error: {e}"),
        _ => bail!("unexpected response to a completion request"),
    };
    // The forced question is part of the generated text: keep what follows it.
    let question = model
        .detokenize(forced, false)
        .await
        .context("detokenizing the question")?;
    let question = question.trim();
    Ok(match text.find(question) {
        Some(at) => text[at + question.len()..].to_string(),
        None => text,
    })
}

/// A case made into token ids: the prompt (resized to the target length), the question, and
/// where the asked needle sits.
pub struct Prompt {
    pub case: cases::Case,
    pub prompt: Vec<u32>,
    pub question: Vec<u32>,
    /// The asked needle's first and last token in the prompt.
    pub needle_tokens: (usize, usize),
}

impl Prompt {
    /// The pages of `page_size` tokens that hold the asked needle.
    pub fn needle_pages(&self, page_size: usize) -> Vec<usize> {
        (self.needle_tokens.0 / page_size..=self.needle_tokens.1 / page_size).collect()
    }
}

/// Words of the prose per token of the model's tokenizer (from one sample).
pub async fn words_per_token(model: &mistralrs::Model, prose: &Prose) -> Result<f64> {
    let sample = tokenize(model, &prose.words(0, 2000)).await?;
    Ok(2000.0 / sample.len() as f64)
}

async fn tokenize(model: &mistralrs::Model, text: &str) -> Result<Vec<u32>> {
    Ok(model
        .tokenize(Either::Right(text.to_string()), None, false, false, None)
        .await?)
}

/// Trial `i` of `task` at about `target` tokens.
pub async fn prompt(
    model: &mistralrs::Model,
    prose: &Prose,
    words_per_token: f64,
    task: Task,
    target: usize,
    i: usize,
    trials: usize,
) -> Result<Prompt> {
    let words = (target as f64 * words_per_token) as usize;
    // Sized once by the prose's words per token, then rescaled to the target (needles and
    // lists add tokens of their own).
    let mut c = cases::case(task, prose, words, i, trials);
    let mut ids = tokenize(model, &c.haystack).await?;
    let mut w = words;
    for _ in 0..3 {
        if ids.len().abs_diff(target) <= target / 20 {
            break;
        }
        let prose_tokens = (w as f64 / words_per_token).min(ids.len() as f64);
        let extra = ids.len() as f64 - prose_tokens;
        w = ((target as f64 - extra).max(50.0) * words_per_token) as usize;
        c = cases::case(task, prose, w, i, trials);
        ids = tokenize(model, &c.haystack).await?;
    }
    let at = c
        .haystack
        .find(c.needle.as_str())
        .context("the needle is not in its haystack")?;
    let first = tokenize(model, &c.haystack[..at]).await?.len();
    let last = tokenize(model, &c.haystack[..at + c.needle.len()])
        .await?
        .len();
    let question = tokenize(model, &c.question).await?;
    Ok(Prompt {
        case: c,
        prompt: ids,
        question,
        needle_tokens: (first, last.saturating_sub(1).max(first)),
    })
}

/// Waits until the instance holds no sequence (the engine frees a finished request's state a
/// moment after its answer), so that a policy switch never meets one in flight.
async fn idle(fk: &FreeKv) -> Result<()> {
    for _ in 0..2000 {
        if fk.live_sequences() == 0 {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    bail!("a finished request's FreeKV state was not freed within 10 s")
}

/// One trial under one arm.
async fn ask(
    model: &mistralrs::Model,
    fk: &FreeKv,
    arm: &Arm,
    p: &Prompt,
) -> Result<(String, freekv_plugin::LayerCounters, f64)> {
    idle(fk).await?;
    fk.set_policy(arm.policy)?;
    let before = fk.counters().total;
    let t = std::time::Instant::now();
    let answer_tokens = 8 * p.case.expected.len() + 4;
    let answer = complete(model, p.prompt.clone(), p.question.clone(), answer_tokens).await?;
    let secs = t.elapsed().as_secs_f64();
    idle(fk).await?;
    Ok((answer, fk.counters().total.since(&before), secs))
}

/// Runs every arm over every task, cell and trial; then traces failing trials.
pub async fn run(cx: &Ctx, plan: &Plan) -> Result<(Vec<Trial>, Vec<NeedleTrace>)> {
    let prose = Prose::load();
    let mut out = Vec::new();
    let mut traces = Vec::new();
    for &(target, budget) in &plan.cells {
        let t = std::time::Instant::now();
        let edge = crate::selection::edges(budget);
        let (sink, window) = plan.edges.unwrap_or((edge, edge));
        let config = FreeKvConfig {
            budget,
            sink,
            window,
            ..FreeKvConfig::default()
        };
        let p = config.page_size;
        // Room for two prompts with their questions and answers (the prefix cache keeps the
        // last one while the next allocates).
        let attention = Attention::FreeKv {
            config,
            context_tokens: (2 * (target + target / 10 + 256)).div_ceil(p) * p,
        };
        let loaded = load(Source::Gguf(&cx.gguf), &attention, 1).await?;
        let model = &loaded.model;
        let fk = loaded.freekv.clone().context("FreeKV instance")?;
        let words_per_token = words_per_token(model, &prose).await?;
        for &task in &plan.tasks {
            for i in 0..plan.trials {
                let pr =
                    prompt(model, &prose, words_per_token, task, target, i, plan.trials).await?;
                for arm in &plan.arms {
                    let (answer, delta, seconds) = ask(model, &fk, arm, &pr).await?;
                    let found = pr
                        .case
                        .expected
                        .iter()
                        .filter(|e| answer.contains(e.as_str()))
                        .count();
                    out.push(Trial {
                        task,
                        variant: arm.name.to_string(),
                        budget: Some(budget),
                        target_tokens: target,
                        trial: i,
                        prompt_tokens: pr.prompt.len(),
                        question_tokens: pr.question.len(),
                        depth: pr.case.depth,
                        needle_tokens: pr.needle_tokens,
                        found,
                        correct: found == pr.case.expected.len(),
                        expected: pr.case.expected.clone(),
                        answer: answer.trim().chars().take(80).collect(),
                        sparse_steps: delta.sparse_steps,
                        correction_rate: delta.correction_rate(),
                        seconds,
                    });
                }
            }
            for arm in &plan.arms {
                let cell: Vec<&Trial> = out
                    .iter()
                    .filter(|t| {
                        t.variant == arm.name && t.task == task && t.target_tokens == target
                    })
                    .collect();
                eprintln!(
                    "retrieval {:<7} {:<28} ~{target:>5} tokens, budget {budget}: {}/{} ({:.0} s so far)",
                    arm.name,
                    task.name(),
                    cell.iter().filter(|t| t.correct).count(),
                    cell.len(),
                    t.elapsed().as_secs_f64()
                );
            }
        }
        // Needle traces: trials the oracle answered and a selector missed, grouped by trial so
        // that the arms of one trial share its prefilled prompt (the prefix cache).
        let mut missed: Vec<(&Arm, Trial)> = Vec::new();
        for arm in plan.arms.iter().filter(|a| a.policy.mode != Mode::Dense) {
            missed.extend(
                out.iter()
                    .filter(|t| t.variant == arm.name && t.target_tokens == target && !t.correct)
                    .filter(|t| {
                        out.iter().any(|o| {
                            o.variant == "oracle"
                                && o.correct
                                && o.task == t.task
                                && o.trial == t.trial
                                && o.target_tokens == target
                        })
                    })
                    .take(plan.traces)
                    .map(|t| (arm, t.clone())),
            );
        }
        missed.sort_by_key(|(_, t)| (t.task, t.trial));
        let mut asked: Option<((Task, usize), Prompt)> = None;
        for (arm, m) in missed {
            let key = (m.task, m.trial);
            let pr = match asked.take() {
                Some((k, pr)) if k == key => pr,
                _ => {
                    prompt(
                        model,
                        &prose,
                        words_per_token,
                        m.task,
                        target,
                        m.trial,
                        plan.trials,
                    )
                    .await?
                }
            };
            traces.push(trace::needle(model, &fk, arm, &pr, &m).await?);
            asked = Some((key, pr));
        }
        fk.set_probe(None)?;
    }
    Ok((out, traces))
}
