//! RULER-style retrieval with the question decoded by the sparse path: a haystack of real prose
//! (the licence texts under /usr/share/common-licenses) with "needles" hidden in it is the
//! prompt (prefilled densely); the question is then fed one decode step at a time (teacher
//! forced through the engine, as Quest, ShadowKV and RetroInfer evaluate), and only then is the
//! answer generated. Every query of the question and the answer attends through the variant's
//! retrieval, so the answer is right only if the needle's pages were selected.
//!
//! Tasks (after RULER's): one key; one key among distractor keys; every value of one key; a
//! value looked up in a list of key-value pairs. Per task and length, trials cycle over depths
//! 10-90% of the asked needle and over fresh keys and values; accuracy is reported with its
//! standard error.

use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use either::Either;
use freekv_integration_tests::engine::{load, Source};
use freekv_integration_tests::prose::Prose;
use mistralrs::core::{
    Constraint, NormalRequest, Request, RequestMessage, Response, SamplingParams,
};
use mistralrs::{CustomLogitsProcessor, Tensor};
use serde::{Deserialize, Serialize};

use crate::variants::Variant;
use crate::Ctx;

/// One retrieval task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Task {
    /// One needle; its number is asked for.
    SingleKey,
    /// The asked needle among three needles of other keys.
    MultiKey,
    /// Three numbers of one key spread over the text; all are asked for.
    MultiValue,
    /// A list of 24 "key: number" lines; one key's number is asked for.
    KvLookup,
}

impl Task {
    pub const ALL: [Task; 4] = [
        Task::SingleKey,
        Task::MultiKey,
        Task::MultiValue,
        Task::KvLookup,
    ];

    fn name(self) -> &'static str {
        match self {
            Task::SingleKey => "single key",
            Task::MultiKey => "multi-key (3 distractors)",
            Task::MultiValue => "multi-value (3 values)",
            Task::KvLookup => "key-value lookup (24 pairs)",
        }
    }
}

/// What to run.
pub struct Plan {
    pub tasks: Vec<Task>,
    /// Target prompt lengths in tokens.
    pub lengths: Vec<usize>,
    pub trials: usize,
    pub variants: Vec<Variant>,
}

impl Plan {
    pub fn new(quick: bool) -> Self {
        use freekv_plugin::Mode::*;
        if quick {
            return Self {
                tasks: Task::ALL.to_vec(),
                lengths: vec![400],
                trials: 1,
                variants: vec![Variant::dense(), Variant::freekv(256, 0.9, FreeKv)],
            };
        }
        // The lengths and trial count come from the environment where a run must be shorter
        // than the full plan (FREEKV_EVAL_LENGTHS="1024,2048", FREEKV_EVAL_TRIALS=20).
        let lengths = std::env::var("FREEKV_EVAL_LENGTHS")
            .ok()
            .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect())
            .unwrap_or_else(|| vec![1024, 2048, 4096, 7500]);
        let trials = std::env::var("FREEKV_EVAL_TRIALS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(20);
        // FREEKV_EVAL_VARIANTS="dense,b512 t0.9" keeps only the variants named.
        let keep: Option<Vec<String>> = std::env::var("FREEKV_EVAL_VARIANTS")
            .ok()
            .map(|v| v.split(',').map(|x| x.trim().to_string()).collect());
        let keep = move |v: &Variant| keep.as_ref().is_none_or(|k| k.contains(&v.name));
        // FREEKV_EVAL_TASKS="single,multi-key" keeps the tasks whose names start so.
        let tasks: Option<Vec<String>> = std::env::var("FREEKV_EVAL_TASKS")
            .ok()
            .map(|v| v.split(',').map(|x| x.trim().to_string()).collect());
        Self {
            tasks: Task::ALL
                .into_iter()
                .filter(|t| {
                    tasks
                        .as_ref()
                        .is_none_or(|k| k.iter().any(|k| t.name().starts_with(k.as_str())))
                })
                .collect(),
            lengths,
            trials,
            variants: [
                Variant::dense(),
                Variant::freekv(256, 0.9, FreeKv),
                Variant::freekv(512, 0.9, FreeKv),
                Variant::freekv(1024, 0.9, FreeKv),
                Variant::freekv(512, 0.8, FreeKv),
                Variant::freekv(512, 0.9, Sync),
                Variant::freekv(512, 0.9, Speculative),
            ]
            .into_iter()
            .filter(keep)
            .collect(),
        }
    }
}

/// One trial.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Trial {
    pub task: Task,
    pub variant: String,
    pub budget: Option<usize>,
    pub target_tokens: usize,
    pub prompt_tokens: usize,
    pub question_tokens: usize,
    /// Depth of the asked needle (of the first value, for multi-value) in the haystack.
    pub depth: f64,
    pub expected: Vec<String>,
    pub answer: String,
    /// Expected values found in the answer.
    pub found: usize,
    /// Every expected value found.
    pub correct: bool,
    pub sparse_steps: u64,
    pub correction_rate: f64,
}

/// A trial's text: the haystack with its needles, the question and what it must answer.
struct Case {
    haystack: String,
    question: String,
    expected: Vec<String>,
    depth: f64,
}

/// Small deterministic PRNG (SplitMix64) for keys, values and placements.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn number(&mut self) -> String {
        format!("{}", 100_000 + self.below(900_000))
    }
}

const KEYS: [&str; 24] = [
    "apple", "river", "candle", "falcon", "meadow", "copper", "lantern", "harbor", "violet",
    "glacier", "thimble", "orchard", "saddle", "quartz", "ember", "willow", "anchor", "pepper",
    "marble", "tundra", "sparrow", "cobalt", "juniper", "velvet",
];

/// Distinct keys, in a random order.
fn keys(rng: &mut Rng, n: usize) -> Vec<&'static str> {
    let mut all = KEYS.to_vec();
    for i in (1..all.len()).rev() {
        all.swap(i, rng.below(i + 1));
    }
    all.truncate(n);
    all
}

/// Inserts `needles` (depth in [0, 1], sentence) into `words` words of prose at the sentence
/// boundary nearest each depth.
fn haystack(prose: &Prose, start: usize, words: usize, needles: &[(f64, String)]) -> String {
    let text: Vec<String> = prose
        .words(start, words)
        .split(' ')
        .map(str::to_string)
        .collect();
    let boundary = |at: usize| {
        (at..text.len())
            .find(|&i| text[i].ends_with('.'))
            .map_or(text.len(), |i| i + 1)
    };
    let mut at: Vec<(usize, &str)> = needles
        .iter()
        .map(|(d, s)| (boundary((d * text.len() as f64) as usize), s.as_str()))
        .collect();
    at.sort_by_key(|a| a.0);
    let mut out = String::new();
    let mut next = 0;
    for (i, w) in text.iter().enumerate() {
        while next < at.len() && at[next].0 == i {
            out.push_str(at[next].1);
            out.push(' ');
            next += 1;
        }
        out.push_str(w);
        out.push(' ');
    }
    for (_, s) in &at[next..] {
        out.push_str(s);
        out.push(' ');
    }
    out
}

/// The case of trial `i` of `task` with `words` words of prose.
fn case(task: Task, prose: &Prose, words: usize, i: usize, trials: usize) -> Case {
    let mut rng = Rng(0x5EED ^ ((task as u64) << 32) ^ (i as u64) ^ ((words as u64) << 8));
    // Depths 10-90% in equal steps over the trials.
    let depth = if trials <= 1 {
        0.5
    } else {
        0.1 + 0.8 * (i % trials) as f64 / (trials - 1) as f64
    };
    let start = rng.below(30_000);
    let other_depth = |rng: &mut Rng| 0.05 + 0.9 * rng.below(1000) as f64 / 1000.0;
    let magic = |k: &str, v: &str| format!("The special magic number for {k} is: {v}.");
    match task {
        Task::SingleKey | Task::MultiKey => {
            let ks = keys(&mut rng, 4);
            let value = rng.number();
            let mut needles = vec![(depth, magic(ks[0], &value))];
            if task == Task::MultiKey {
                for k in &ks[1..] {
                    let d = other_depth(&mut rng);
                    needles.push((d, magic(k, &rng.number())));
                }
            }
            Case {
                haystack: haystack(prose, start, words, &needles),
                question: format!(
                    "\n\nQuestion: What is the special magic number for {} mentioned in the text \
                     above?\nAnswer: The special magic number for {} is:",
                    ks[0], ks[0]
                ),
                expected: vec![value],
                depth,
            }
        }
        Task::MultiValue => {
            let k = keys(&mut rng, 1)[0];
            let values: Vec<String> = (0..3).map(|_| rng.number()).collect();
            let mut needles = vec![(
                depth,
                format!(
                    "One of the special magic numbers for {k} is: {}.",
                    values[0]
                ),
            )];
            for v in &values[1..] {
                let d = other_depth(&mut rng);
                needles.push((
                    d,
                    format!("One of the special magic numbers for {k} is: {v}."),
                ));
            }
            Case {
                haystack: haystack(prose, start, words, &needles),
                question: format!(
                    "\n\nQuestion: What are all the special magic numbers for {k} mentioned in \
                     the text above?\nAnswer: The special magic numbers for {k} are:"
                ),
                expected: values,
                depth,
            }
        }
        Task::KvLookup => {
            let ks = keys(&mut rng, 24);
            let lines: Vec<(String, String)> = ks
                .iter()
                .map(|k| (format!("{k}-{}", rng.below(90) + 10), rng.number()))
                .collect();
            let asked = rng.below(lines.len());
            let mut list = String::from("Here is a list of keys and their numbers:");
            for (k, v) in &lines {
                list.push_str(&format!("\n{k}: {v}"));
            }
            list.push_str("\nEnd of the list.");
            Case {
                haystack: haystack(prose, start, words, &[(depth, list)]),
                question: format!(
                    "\n\nQuestion: What is the number of the key {} in the list above?\nAnswer: \
                     The number of the key {} is:",
                    lines[asked].0, lines[asked].0
                ),
                expected: vec![lines[asked].1.clone()],
                depth,
            }
        }
    }
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
async fn complete(
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

/// Runs every variant over every task, length and trial.
pub async fn run(cx: &Ctx, plan: &Plan) -> Result<Vec<Trial>> {
    let prose = Prose::load();
    let longest = plan.lengths.iter().copied().max().unwrap_or(1024);
    let mut out = Vec::new();
    for v in &plan.variants {
        let t = std::time::Instant::now();
        let loaded = load(Source::Gguf(&cx.gguf), &v.attention(longest + 256), 1).await?;
        let model = &loaded.model;
        // Words per token of this prose, from one sample.
        let sample = prose.words(0, 2000);
        let sample_ids = model
            .tokenize(Either::Right(sample), None, false, false, None)
            .await?;
        let words_per_token = 2000.0 / sample_ids.len() as f64;
        for &task in &plan.tasks {
            for &target in &plan.lengths {
                let words = (target as f64 * words_per_token) as usize;
                for i in 0..plan.trials {
                    // Sized once by the prose's words per token, then rescaled to the target
                    // (needles and lists add tokens of their own).
                    let mut c = case(task, &prose, words, i, plan.trials);
                    let mut prompt = model
                        .tokenize(Either::Right(c.haystack.clone()), None, false, false, None)
                        .await?;
                    let mut w = words;
                    for _ in 0..3 {
                        if prompt.len().abs_diff(target) <= target / 20 {
                            break;
                        }
                        // Tokens the prose does not explain (needles, the list) stay fixed.
                        let prose_tokens = (w as f64 / words_per_token).min(prompt.len() as f64);
                        let extra = prompt.len() as f64 - prose_tokens;
                        w = ((target as f64 - extra).max(50.0) * words_per_token) as usize;
                        c = case(task, &prose, w, i, plan.trials);
                        prompt = model
                            .tokenize(Either::Right(c.haystack.clone()), None, false, false, None)
                            .await?;
                    }
                    let forced = model
                        .tokenize(Either::Right(c.question.clone()), None, false, false, None)
                        .await?;
                    let before = loaded.freekv.as_ref().map(|f| f.counters().total);
                    let (prompt_tokens, question_tokens) = (prompt.len(), forced.len());
                    let answer_tokens = 8 * c.expected.len() + 4;
                    let answer = complete(model, prompt, forced, answer_tokens).await?;
                    let found = c
                        .expected
                        .iter()
                        .filter(|e| answer.contains(e.as_str()))
                        .count();
                    let delta = match (&loaded.freekv, before) {
                        (Some(f), Some(b)) => f.counters().total.since(&b),
                        _ => Default::default(),
                    };
                    out.push(Trial {
                        task,
                        variant: v.name.clone(),
                        budget: v.budget(),
                        target_tokens: target,
                        prompt_tokens,
                        question_tokens,
                        depth: c.depth,
                        found,
                        correct: found == c.expected.len(),
                        expected: c.expected,
                        answer: answer.trim().chars().take(80).collect(),
                        sparse_steps: delta.sparse_steps,
                        correction_rate: delta.correction_rate(),
                    });
                }
                let cell: Vec<&Trial> = out
                    .iter()
                    .filter(|t| t.variant == v.name && t.task == task && t.target_tokens == target)
                    .collect();
                let ok = cell.iter().filter(|t| t.correct).count();
                eprintln!(
                    "retrieval {:<10} {:<28} ~{target:>5} tokens: {ok}/{} ({:.0} s so far)",
                    v.name,
                    task.name(),
                    cell.len(),
                    t.elapsed().as_secs_f64()
                );
            }
        }
    }
    Ok(out)
}

/// Accuracy and its standard error over `trials`.
fn accuracy(trials: &[&Trial]) -> (f64, f64) {
    let n = trials.len().max(1) as f64;
    let p = trials.iter().filter(|t| t.correct).count() as f64 / n;
    (p, (p * (1.0 - p) / n).sqrt())
}

/// Markdown: per task, accuracy (± standard error) per variant and length; a FreeKV cell is
/// starred where it is more than one standard error below dense.
pub fn table(trials: &[Trial]) -> String {
    let mut variants: Vec<String> = Vec::new();
    for t in trials {
        if !variants.contains(&t.variant) {
            variants.push(t.variant.clone());
        }
    }
    let mut lengths: Vec<usize> = trials.iter().map(|t| t.target_tokens).collect();
    lengths.sort_unstable();
    lengths.dedup();
    let mut md = String::new();
    for task in Task::ALL {
        if !trials.iter().any(|t| t.task == task) {
            continue;
        }
        md += &format!("\n**{}**\n\n| variant |", task.name());
        for l in &lengths {
            md += &format!(" ~{l} tokens |");
        }
        md += "\n|---|";
        md += &"---|".repeat(lengths.len());
        md += "\n";
        for v in &variants {
            md += &format!("| {v} |");
            for &l in &lengths {
                let cell: Vec<&Trial> = trials
                    .iter()
                    .filter(|t| t.task == task && &t.variant == v && t.target_tokens == l)
                    .collect();
                let dense: Vec<&Trial> = trials
                    .iter()
                    .filter(|t| t.task == task && t.variant == "dense" && t.target_tokens == l)
                    .collect();
                let (p, se) = accuracy(&cell);
                let (pd, sed) = accuracy(&dense);
                let below = v != "dense" && !dense.is_empty() && p < pd - se.max(sed);
                md += &format!(
                    " {:.0}% ± {:.0}{} (n={}) |",
                    100.0 * p,
                    100.0 * se,
                    if below { " *" } else { "" },
                    cell.len()
                );
            }
            md += "\n";
        }
    }
    md += "\n\\* more than one standard error below dense.\n";
    md
}

/// Accuracy vs budget, one line per task (all lengths pooled; dense drawn past the budgets).
pub fn chart(trials: &[Trial]) -> crate::plot::Chart<'static> {
    let max_budget = trials.iter().filter_map(|t| t.budget).max().unwrap_or(512);
    let series = Task::ALL
        .iter()
        .filter(|&&task| trials.iter().any(|t| t.task == task))
        .map(|&task| {
            let mut cells = std::collections::BTreeMap::<usize, (usize, usize)>::new();
            for t in trials
                .iter()
                .filter(|t| t.task == task && (t.variant == "dense" || t.variant.ends_with("t0.9")))
            {
                let c = cells.entry(t.budget.unwrap_or(2 * max_budget)).or_default();
                c.0 += t.correct as usize;
                c.1 += 1;
            }
            crate::plot::Series {
                label: task.name().to_string(),
                points: cells
                    .iter()
                    .map(|(&x, &(ok, n))| (x as f64, ok as f64 / n as f64))
                    .collect(),
            }
        })
        .collect();
    crate::plot::Chart {
        title: "Retrieval accuracy vs FreeKV budget (question decoded sparsely)",
        x_named: Some((2.0 * max_budget as f64, "dense")),
        x_label: "budget (tokens, log scale)",
        y_label: "accuracy",
        y_range: Some((0.0, 1.05)),
        log2_x: true,
        series,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn needles_land_in_the_haystack_at_their_depths() {
        let prose = Prose::load();
        for task in Task::ALL {
            for i in 0..5 {
                let c = case(task, &prose, 800, i, 5);
                for e in &c.expected {
                    assert!(c.haystack.contains(e.as_str()), "{task:?} {i}: {e} missing");
                }
                assert!(c.question.ends_with(':'), "{}", c.question);
            }
        }
        // The asked needle sits near its depth.
        let c = case(Task::SingleKey, &prose, 2000, 0, 5);
        let at = c.haystack.find(c.expected[0].as_str()).unwrap() as f64;
        let rel = at / c.haystack.len() as f64;
        assert!(
            (rel - 0.1).abs() < 0.05,
            "needle at {rel:.2}, asked for 0.1"
        );
    }
}
