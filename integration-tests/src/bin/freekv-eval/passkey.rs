//! Part 1, passkey retrieval: a 5-digit key hidden at several depths of a synthetic haystack,
//! asked for at the end; accuracy per variant and prompt length. The question sits in the
//! prompt (dense prefill); the answer's digits are decoded with the variant's attention, so
//! they can only be right if the key's page was retrieved.

use anyhow::Result;
use freekv_examples::passkey::{is_correct, passkey};
use freekv_integration_tests::engine::{greedy, load, Source};
use serde::{Deserialize, Serialize};

use crate::variants::Variant;
use crate::Ctx;

/// One trial.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Trial {
    pub variant: String,
    pub budget: Option<usize>,
    pub target_tokens: usize,
    pub prompt_tokens: usize,
    pub depth: f64,
    pub key: String,
    pub answer: String,
    pub correct: bool,
    pub sparse_steps: u64,
    pub correction_rate: f64,
}

/// What to run: main variants over every length and depth, ablations over fewer lengths.
pub struct Plan {
    pub lengths: Vec<usize>,
    pub depths: Vec<f64>,
    /// Depths used at the longest length (fewer: its prefill dominates the run time).
    pub longest_depths: Vec<f64>,
    pub main: Vec<Variant>,
    pub ablations: Vec<Variant>,
    pub ablation_lengths: Vec<usize>,
}

impl Plan {
    pub fn new(quick: bool) -> Self {
        use freekv_plugin::Mode::*;
        if quick {
            return Self {
                lengths: vec![600],
                depths: vec![0.5],
                longest_depths: vec![0.5],
                main: vec![Variant::dense(), Variant::freekv(256, 0.9, FreeKv)],
                ablations: vec![],
                ablation_lengths: vec![],
            };
        }
        Self {
            lengths: vec![1024, 2048, 4096],
            depths: vec![0.1, 0.5, 0.9],
            longest_depths: vec![0.3, 0.7],
            main: vec![
                Variant::dense(),
                Variant::freekv(256, 0.9, FreeKv),
                Variant::freekv(512, 0.9, FreeKv),
                Variant::freekv(1024, 0.9, FreeKv),
            ],
            ablations: vec![
                Variant::freekv(512, 0.8, FreeKv),
                Variant::freekv(512, 0.9, Sync),
                Variant::freekv(512, 0.9, Speculative),
            ],
            ablation_lengths: vec![2048],
        }
    }

    fn cases(&self, lengths: &[usize]) -> Vec<(usize, f64)> {
        let longest = self.lengths.iter().copied().max().unwrap_or(0);
        let mut out = Vec::new();
        for &len in lengths {
            let depths = if len == longest && self.lengths.len() > 1 {
                &self.longest_depths
            } else {
                &self.depths
            };
            out.extend(depths.iter().map(|&d| (len, d)));
        }
        out
    }
}

/// Runs the plan; one engine load per variant.
pub async fn run(cx: &Ctx, plan: &Plan) -> Result<Vec<Trial>> {
    let mut trials = Vec::new();
    let groups = [
        (&plan.main, plan.cases(&plan.lengths)),
        (&plan.ablations, plan.cases(&plan.ablation_lengths)),
    ];
    for (variants, cases) in groups {
        let longest = cases.iter().map(|c| c.0).max().unwrap_or(0);
        for v in variants.iter() {
            let loaded = load(Source::Gguf(&cx.gguf), &v.attention(longest + 128), 1).await?;
            for (i, &(len, depth)) in cases.iter().enumerate() {
                let task = passkey(len, depth, 1000 + i as u64);
                let before = loaded.freekv.as_ref().map(|f| f.counters().total);
                let g = greedy(&loaded.model, &task.prompt, 16).await?;
                let after = loaded.freekv.as_ref().map(|f| f.counters().total);
                let (sparse_steps, correction_rate) = match (before, after) {
                    (Some(b), Some(a)) => {
                        let d = a.since(&b);
                        (d.sparse_steps, d.correction_rate())
                    }
                    _ => (0, 0.0),
                };
                let t = Trial {
                    variant: v.name.clone(),
                    budget: v.budget(),
                    target_tokens: len,
                    prompt_tokens: g.prompt_tokens,
                    depth,
                    correct: is_correct(&g.text, &task.key),
                    key: task.key,
                    answer: g.text.trim().chars().take(60).collect(),
                    sparse_steps,
                    correction_rate,
                };
                eprintln!(
                    "passkey {:<12} {:>5} tokens depth {:.1}: {} (key {}, answer {:?})",
                    t.variant,
                    t.prompt_tokens,
                    t.depth,
                    if t.correct { "correct" } else { "WRONG" },
                    t.key,
                    t.answer
                );
                trials.push(t);
            }
        }
    }
    Ok(trials)
}

/// The prompt lengths tried, ascending.
fn lengths(trials: &[Trial]) -> Vec<usize> {
    let set: std::collections::BTreeSet<usize> = trials.iter().map(|t| t.target_tokens).collect();
    set.into_iter().collect()
}

/// Markdown: accuracy per variant (rows) and prompt length (columns).
pub fn table(trials: &[Trial]) -> String {
    let lengths = lengths(trials);
    let mut variants: Vec<&str> = Vec::new();
    for t in trials {
        if !variants.contains(&t.variant.as_str()) {
            variants.push(&t.variant);
        }
    }
    let mut s = String::from("| variant |");
    for l in &lengths {
        s += &format!(" ~{l} tokens |");
    }
    s += " all |\n|---|";
    s += &"---|".repeat(lengths.len() + 1);
    s += "\n";
    for v in variants {
        s += &format!("| {v} |");
        let of = |f: &dyn Fn(&Trial) -> bool| {
            let sel: Vec<&Trial> = trials.iter().filter(|t| t.variant == v && f(t)).collect();
            let ok = sel.iter().filter(|t| t.correct).count();
            if sel.is_empty() {
                " - |".to_string()
            } else {
                format!(" {ok}/{} |", sel.len())
            }
        };
        for &l in &lengths {
            s += &of(&|t: &Trial| t.target_tokens == l);
        }
        s += &of(&|_| true);
        s += "\n";
    }
    s
}

/// Accuracy vs budget, one series per prompt length: dense and the tau-0.9 FreeKV variants
/// (dense drawn at twice the largest budget).
pub fn chart(trials: &[Trial]) -> crate::plot::Chart<'static> {
    let max_budget = trials.iter().filter_map(|t| t.budget).max().unwrap_or(512);
    // (prompt length, x) -> (correct, trials); ordered by length, then x.
    let mut cells = std::collections::BTreeMap::<(usize, usize), (usize, usize)>::new();
    for t in trials
        .iter()
        .filter(|t| t.variant == "dense" || t.variant.ends_with("t0.9"))
    {
        let x = t.budget.unwrap_or(2 * max_budget);
        let cell = cells.entry((t.target_tokens, x)).or_default();
        cell.0 += t.correct as usize;
        cell.1 += 1;
    }
    let series = lengths(trials)
        .into_iter()
        .map(|l| crate::plot::Series {
            label: format!("~{l}-token prompt"),
            points: cells
                .range((l, 0)..=(l, usize::MAX))
                .map(|(&(_, x), &(ok, n))| (x as f64, ok as f64 / n as f64))
                .collect(),
        })
        .collect();
    crate::plot::Chart {
        title: "Passkey accuracy vs FreeKV budget",
        x_named: Some((2.0 * max_budget as f64, "dense")),
        x_label: "budget (tokens, log scale)",
        y_label: "accuracy",
        y_range: Some((0.0, 1.05)),
        log2_x: true,
        series,
    }
}
