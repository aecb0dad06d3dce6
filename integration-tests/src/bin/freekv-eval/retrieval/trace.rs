//! The trace of a failing trial: the trial is asked again under the same policy with the
//! selection probe watching the asked needle's pages, and each decode step says in how many
//! (layer, KV head) pairs a needle page was attended, where the selector and the oracle (with
//! the step's own query) rank it among the candidates, and how much attention it holds.

use std::collections::BTreeMap;

use anyhow::Result;
use freekv_plugin::probe::{Estimator, ProbeSpec, EXACT_KEYS};
use freekv_plugin::{FreeKv, Selector};
use serde::{Deserialize, Serialize};

use super::{ask, Arm, Prompt, Task, Trial};

/// One decode step of a traced trial, over every probed (layer, KV head) pair.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TraceStep {
    /// Context length of the step.
    pub len: usize,
    /// (layer, KV head) pairs probed.
    pub pairs: usize,
    /// Pairs that attended a needle page at this step.
    pub attended: usize,
    /// Pairs whose oracle (exact mass, this step's query) ranks a needle page within the
    /// selected pages.
    pub oracle_selects: usize,
    /// Median over pairs of the needle's best rank among the candidates, by the selector's
    /// scores with this step's query, and by exact mass.
    pub median_rank: f64,
    pub median_oracle_rank: f64,
    /// Mean over pairs of the needle pages' attention mass.
    pub mass: f64,
}

/// A failing trial, step by step.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NeedleTrace {
    pub task: Task,
    pub variant: String,
    pub target_tokens: usize,
    pub trial: usize,
    pub expected: Vec<String>,
    pub answer: String,
    pub needle_pages: Vec<usize>,
    /// Selected pages per KV head.
    pub selected_pages: usize,
    pub steps: Vec<TraceStep>,
}

fn median(mut x: Vec<usize>) -> f64 {
    if x.is_empty() {
        return f64::NAN;
    }
    x.sort_unstable();
    let n = x.len();
    if n % 2 == 1 {
        x[n / 2] as f64
    } else {
        (x[n / 2 - 1] + x[n / 2]) as f64 / 2.0
    }
}

/// Asks trial `t` again under `arm` with the probe watching its needle.
pub async fn needle(
    model: &mistralrs::Model,
    fk: &FreeKv,
    arm: &Arm,
    p: &Prompt,
    t: &Trial,
) -> Result<NeedleTrace> {
    let cfg = fk.config();
    let ps = cfg.page_size;
    let pages = p.needle_pages(ps);
    let (_, _, sel, _) = cfg.pages();
    // The arm's own selector ranks the needle.
    let own = match arm.policy.selector {
        Selector::Rerank => Estimator {
            proxy_bits: EXACT_KEYS,
            shortlist: arm.policy.shortlist,
            shrink_pct: 50,
            ..Estimator::quest(ps)
        },
        _ => Estimator::quest(ps),
    };
    fk.set_probe(Some(ProbeSpec {
        estimators: vec![own],
        splits: Vec::new(),
        watch: pages.clone(),
    }))?;
    let (answer, _, _) = ask(model, fk, arm, p).await?;
    let oracle = arm.policy.selector == Selector::Oracle;
    let report = fk.take_probe();
    fk.set_probe(None)?;
    // Per step, per (layer, head): the needle's best rank, whether attended, its mass.
    #[derive(Default)]
    struct Pair {
        rank: Option<usize>,
        oracle: Option<usize>,
        attended: bool,
        mass: f64,
    }
    let mut steps: BTreeMap<usize, BTreeMap<(usize, usize), Pair>> = BTreeMap::new();
    for w in &report.watch {
        let pair = steps
            .entry(w.len)
            .or_default()
            .entry((w.layer, w.head))
            .or_default();
        let best = |a: Option<usize>, b: Option<usize>| match (a, b) {
            (Some(x), Some(y)) => Some(x.min(y)),
            (x, y) => x.or(y),
        };
        // An oracle arm's selector is the oracle.
        let own = if oracle {
            w.oracle_rank
        } else {
            w.ranks.first().copied().flatten()
        };
        pair.rank = best(pair.rank, own);
        pair.oracle = best(pair.oracle, w.oracle_rank);
        pair.attended |= w.resident.unwrap_or(false);
        pair.mass += w.mass as f64;
    }
    let steps = steps
        .into_iter()
        .map(|(len, pairs)| TraceStep {
            len,
            pairs: pairs.len(),
            attended: pairs.values().filter(|p| p.attended).count(),
            oracle_selects: pairs
                .values()
                .filter(|p| p.oracle.is_some_and(|r| r <= sel))
                .count(),
            median_rank: median(pairs.values().filter_map(|p| p.rank).collect()),
            median_oracle_rank: median(pairs.values().filter_map(|p| p.oracle).collect()),
            mass: pairs.values().map(|p| p.mass).sum::<f64>() / pairs.len().max(1) as f64,
        })
        .collect();
    Ok(NeedleTrace {
        task: t.task,
        variant: arm.name.to_string(),
        target_tokens: t.target_tokens,
        trial: t.trial,
        expected: t.expected.clone(),
        answer: answer.trim().chars().take(80).collect(),
        needle_pages: pages,
        selected_pages: sel,
        steps,
    })
}
