//! Needle diagnostics (docs/results.md, section 1c): the retrieval part's single-key cases,
//! answered in FreeKV's dense mode (the dense model's queries) with the selection probe
//! watching the asked needle's pages. At every step of the question and the answer, per
//! retrieving layer and KV head, the oracle at the budget either selects a needle page or not;
//! where it does, does each estimator? That share ("needle recall") is what retrieval needs,
//! where the attention mass a selection captures is dominated by pages that hold no needle.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use freekv_integration_tests::engine::{load, Attention, Source};
use freekv_integration_tests::prose::Prose;
use freekv_plugin::probe::{ProbeSpec, WatchRecord};
use freekv_plugin::{Mode, Policy};
use serde::{Deserialize, Serialize};

use crate::retrieval::{self, Task};
use crate::selection::{at_budget, estimators, product_note, QUEST, RERANK};
use crate::Ctx;

/// One (length, budget) cell.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NeedleCell {
    pub target_tokens: usize,
    pub budget: usize,
    pub trials: usize,
    /// Selected pages per KV head.
    pub selected_pages: usize,
    pub estimators: Vec<String>,
    /// (step, layer, KV head) samples probed.
    pub samples: u64,
    /// Samples where the oracle selects a needle page.
    pub oracle_selects: u64,
    /// Per estimator: samples where it selects a needle page too.
    pub hits: Vec<u64>,
    /// Per estimator: samples where it selects a needle page while the oracle selects none.
    pub extra: Vec<u64>,
}

/// The cells and trials per cell: the retrieval part's (`FREEKV_EVAL_LENGTHS`,
/// `FREEKV_EVAL_BUDGETS` and `FREEKV_EVAL_TRIALS` narrow them), by default ~2K and ~4K tokens
/// with 10 trials each.
pub fn cells(quick: bool) -> (Vec<(usize, usize)>, usize) {
    if quick {
        return (vec![(400, 128)], 1);
    }
    let plan = retrieval::Plan::new(false);
    let cells = if std::env::var_os("FREEKV_EVAL_LENGTHS").is_some() {
        plan.cells
    } else {
        plan.cells.into_iter().filter(|c| c.0 <= 4096).collect()
    };
    let trials = if std::env::var_os("FREEKV_EVAL_TRIALS").is_some() {
        plan.trials
    } else {
        10
    };
    (cells, trials)
}

/// Per (step, layer, head): whether the oracle and each estimator rank a needle page within
/// the `k` selected.
fn tally(records: &[WatchRecord], k: usize, n_est: usize, cell: &mut NeedleCell) {
    let mut samples: BTreeMap<(usize, usize, usize), (bool, Vec<bool>)> = BTreeMap::new();
    for w in records {
        let s = samples
            .entry((w.len, w.layer, w.head))
            .or_insert_with(|| (false, vec![false; n_est]));
        s.0 |= w.oracle_rank.is_some_and(|r| r <= k);
        for (hit, rank) in s.1.iter_mut().zip(&w.ranks) {
            *hit |= rank.is_some_and(|r| r <= k);
        }
    }
    for (oracle, est) in samples.values() {
        cell.samples += 1;
        cell.oracle_selects += *oracle as u64;
        for (e, &hit) in est.iter().enumerate() {
            if hit && *oracle {
                cell.hits[e] += 1;
            } else if hit {
                cell.extra[e] += 1;
            }
        }
    }
}

pub async fn run(cx: &Ctx) -> Result<Vec<NeedleCell>> {
    let prose = Prose::load();
    let (plan, trials) = cells(cx.quick);
    let mut out = Vec::new();
    for (target, budget) in plan {
        let t = std::time::Instant::now();
        let config = at_budget(budget);
        let (p, sel) = (config.page_size, config.pages().2);
        let attention = Attention::FreeKv {
            config,
            context_tokens: (2 * (target + target / 10 + 256)).div_ceil(p) * p,
        };
        let loaded = load(Source::Gguf(&cx.gguf), &attention, 1).await?;
        let fk = loaded.freekv.clone().context("FreeKV instance")?;
        fk.set_policy(Policy {
            mode: Mode::Dense,
            ..fk.policy()
        })?;
        let est = estimators(p);
        let mut cell = NeedleCell {
            target_tokens: target,
            budget,
            trials,
            selected_pages: sel,
            estimators: est.iter().map(|e| e.label()).collect(),
            samples: 0,
            oracle_selects: 0,
            hits: vec![0; est.len()],
            extra: vec![0; est.len()],
        };
        let words_per_token = retrieval::words_per_token(&loaded.model, &prose).await?;
        for i in 0..trials {
            let pr = retrieval::prompt(
                &loaded.model,
                &prose,
                words_per_token,
                Task::SingleKey,
                target,
                i,
                trials,
            )
            .await?;
            fk.set_probe(Some(ProbeSpec {
                estimators: est.clone(),
                splits: Vec::new(),
                watch: pr.needle_pages(p),
            }))?;
            retrieval::complete(&loaded.model, pr.prompt.clone(), pr.question.clone(), 12).await?;
            let report = fk.take_probe();
            fk.set_probe(None)?;
            tally(&report.watch, sel, est.len(), &mut cell);
        }
        eprintln!(
            "needles ~{target} tokens, budget {budget}: the oracle selects the needle in {} of {} samples; quest {}, rerank {} ({:.0} s)",
            cell.oracle_selects,
            cell.samples,
            cell.hits[QUEST],
            cell.hits[RERANK],
            t.elapsed().as_secs_f64()
        );
        out.push(cell);
    }
    Ok(out)
}

/// Markdown: per cell, each estimator's needle recall against the oracle.
pub fn table(cells: &[NeedleCell]) -> String {
    let mut md = String::new();
    for c in cells {
        md += &format!(
            "\n**Needles, ~{} tokens, budget {} ({} selected pages), {} single-key trials**: the \
             oracle selects a needle page in {} of {} (step, layer, KV head) samples.\n\n",
            c.target_tokens, c.budget, c.selected_pages, c.trials, c.oracle_selects, c.samples
        );
        md += "| selection | needle recall vs oracle | samples where it selects a needle page and the oracle none |\n|---|---|---|\n";
        let mut order: Vec<usize> = (0..c.estimators.len()).collect();
        order.sort_by_key(|&e| std::cmp::Reverse(c.hits[e]));
        for e in order {
            let product = product_note(e);
            md += &format!(
                "| {}{product} | {:.3} | {} |\n",
                c.estimators[e],
                c.hits[e] as f64 / c.oracle_selects.max(1) as f64,
                c.extra[e]
            );
        }
    }
    md
}
