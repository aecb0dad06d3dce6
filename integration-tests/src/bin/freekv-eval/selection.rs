//! Selection diagnostics on real queries (docs/results.md, section 1c): real prose is the
//! prompt and its continuation is teacher forced, with FreeKV in mode `dense` (so every query
//! is the dense model's) and the selection probe on (`freekv_plugin::probe`). At every step
//! of every retrieving layer past the budget, per KV head, the probe measures the attention
//! mass that sink + window + the pages each estimator would select capture, against the
//! oracle at the same budget (pages by exact mass, pooled over the GQA group; and per query
//! head, an upper bound no group-consistent working set reaches), and each estimator's page
//! recall against the oracle. Budgets are 1/8 of the context; several sink/window splits of
//! the same budget are measured too.

use anyhow::{Context, Result};
use either::Either;
use freekv_integration_tests::engine::{load, Attention, Source};
use freekv_integration_tests::prose::Prose;
use freekv_plugin::probe::{Combine, Estimator, Pairs, ProbeReport, ProbeSpec, Split, EXACT_KEYS};
use freekv_plugin::{FreeKvConfig, Mode, Policy, Pooling, SummaryKind};
use serde::{Deserialize, Serialize};

use crate::Ctx;

/// What to run.
pub struct Plan {
    /// (prompt tokens, budget) per cell.
    pub cells: Vec<(usize, usize)>,
    /// Tokens forced after the prompt (probed steps).
    pub forced: usize,
    /// Sink and window splits of the budget to measure, the instance's first.
    pub splits: Vec<Split>,
}

impl Plan {
    pub fn new(quick: bool) -> Self {
        if quick {
            return Self {
                cells: vec![(600, 128)],
                forced: 4,
                splits: vec![
                    Split {
                        sink: 32,
                        window: 32,
                    },
                    Split {
                        sink: 0,
                        window: 32,
                    },
                ],
            };
        }
        Self {
            cells: vec![(4096, 512), (7500, 1024)],
            forced: 32,
            splits: [(128, 128), (64, 64), (32, 64), (32, 32), (0, 32)]
                .map(|(sink, window)| Split { sink, window })
                .to_vec(),
        }
    }
}

/// The estimators compared: the product's selectors first (today's page bounds, then the
/// rerank selector with its default shortlist of 2), then the candidates measured to choose
/// it.
pub fn estimators(p: usize) -> Vec<Estimator> {
    let q = Estimator::quest(p);
    let scaled = Estimator { scaled: true, ..q };
    let token_level = |proxy_bits, shortlist| Estimator {
        proxy_bits,
        shortlist,
        ..q
    };
    let mut out = vec![
        q,
        Estimator {
            shrink_pct: 50,
            ..token_level(EXACT_KEYS, 4)
        },
        token_level(EXACT_KEYS, 2),
        scaled,
        Estimator {
            pooling: Pooling::Mean,
            ..q
        },
        Estimator {
            pooling: Pooling::Max,
            ..q
        },
        Estimator {
            summary: SummaryKind::CentreMad,
            ..scaled
        },
    ];
    // Finer summaries inside a transfer page.
    for sub in [16, 8] {
        out.push(Estimator { sub, ..scaled });
        out.push(Estimator {
            sub,
            combine: Combine::Mass,
            ..scaled
        });
    }
    // Token-level estimates over every candidate, from low-bit key proxies.
    for bits in [4, 2, 1] {
        out.push(token_level(bits, 0));
    }
    // Page bounds tightened by the norms of rotary channel pairs (either pairing).
    for pairs in [Pairs::Half, Pairs::Adjacent] {
        out.push(Estimator { pairs, ..scaled });
        out.push(Estimator {
            pairs,
            ..token_level(EXACT_KEYS, 2)
        });
    }
    // The rerank's shortlist by other page estimates: centre +/- deviation boxes, finer runs.
    for shortlist in [2, 4] {
        out.push(Estimator {
            summary: SummaryKind::CentreMad,
            ..token_level(EXACT_KEYS, shortlist)
        });
        out.push(Estimator {
            sub: 8,
            combine: Combine::Mass,
            ..token_level(EXACT_KEYS, shortlist)
        });
    }
    // ... or min/max summaries shrunk to a typical box (no other summaries kept).
    for shrink_pct in [25, 50] {
        out.push(Estimator {
            shrink_pct,
            ..scaled
        });
        for shortlist in [2, 4] {
            if (shrink_pct, shortlist) != (50, 4) {
                out.push(Estimator {
                    shrink_pct,
                    ..token_level(EXACT_KEYS, shortlist)
                });
            }
        }
    }
    // The rerank's shortlist taken per query head.
    for shortlist in [2, 4] {
        out.push(Estimator {
            per_head_shortlist: true,
            ..token_level(EXACT_KEYS, shortlist)
        });
    }
    // A token-level rerank of the best pages by the page bound: low-bit proxies or the keys.
    for bits in [2, 3, 4, EXACT_KEYS] {
        for shortlist in [2, 4, 8] {
            if (bits, shortlist) != (EXACT_KEYS, 2) {
                out.push(token_level(bits, shortlist));
            }
        }
    }
    out
}

/// The indices in [`estimators`] of the product's selectors: today's page bounds (`quest`)
/// and the rerank.
pub const QUEST: usize = 0;
pub const RERANK: usize = 1;

/// What a table says after an estimator's label: which product selector it is, if any.
pub fn product_note(e: usize) -> &'static str {
    match e {
        QUEST => " (**quest**, today's selector)",
        RERANK => " (**rerank**, the new selector)",
        _ => "",
    }
}

/// One cell's measurements.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Cell {
    pub prompt_tokens: usize,
    pub budget: usize,
    pub forced: usize,
    pub report: ProbeReport,
}

/// The budget's sink and window (a quarter of the budget each, at most 128 tokens), as every
/// accuracy part of the evaluation splits it.
pub fn edges(budget: usize) -> usize {
    (budget / 4).min(128)
}

/// FreeKV's defaults at `budget` with its sink and window split by [`edges`].
pub fn at_budget(budget: usize) -> FreeKvConfig {
    let edge = edges(budget);
    FreeKvConfig {
        budget,
        sink: edge,
        window: edge,
        ..FreeKvConfig::default()
    }
}

pub async fn run(cx: &Ctx, plan: &Plan) -> Result<Vec<Cell>> {
    let prose = Prose::load();
    let mut out = Vec::new();
    for &(tokens, budget) in &plan.cells {
        let t = std::time::Instant::now();
        let config = at_budget(budget);
        let p = config.page_size;
        let attention = Attention::FreeKv {
            config,
            context_tokens: (2 * (tokens + plan.forced + 64)).div_ceil(p) * p,
        };
        let loaded = load(Source::Gguf(&cx.gguf), &attention, 1).await?;
        let fk = loaded.freekv.context("FreeKV instance")?;
        // Dense attention: the probe sees the dense model's queries.
        fk.set_policy(Policy {
            mode: Mode::Dense,
            ..fk.policy()
        })?;
        let words = tokens * 2;
        let ids = loaded
            .model
            .tokenize(
                Either::Right(prose.words(1000, words)),
                None,
                false,
                false,
                None,
            )
            .await
            .context("tokenizing the prose")?;
        anyhow::ensure!(
            ids.len() >= tokens + plan.forced,
            "{} words of prose are only {} tokens",
            words,
            ids.len()
        );
        // The instance's own split comes first (the probe adds it where missing).
        let mut splits = plan.splits.clone();
        splits.retain(|s| s.sink + s.window < budget);
        fk.set_probe(Some(ProbeSpec {
            estimators: estimators(p),
            splits,
            watch: Vec::new(),
        }))?;
        crate::retrieval::complete(
            &loaded.model,
            ids[..tokens].to_vec(),
            ids[tokens..tokens + plan.forced].to_vec(),
            0,
        )
        .await?;
        let report = fk.take_probe();
        fk.set_probe(None)?;
        let m = report.means(None, 0);
        eprintln!(
            "selection ~{tokens} tokens, budget {budget}: {} head-steps; oracle {:.3}, {} {:.3} ({:.0} s)",
            m.steps,
            m.oracle,
            report.estimators[0],
            m.mass[0],
            t.elapsed().as_secs_f64()
        );
        out.push(Cell {
            prompt_tokens: tokens,
            budget,
            forced: plan.forced,
            report,
        });
    }
    Ok(out)
}

/// The tables: per cell, every estimator at the instance's split (mass, share of the oracle's,
/// recall); the oracle and the best estimators at every split; and per layer.
pub fn tables(cells: &[Cell]) -> String {
    let mut md = String::new();
    for c in cells {
        let r = &c.report;
        let m = r.means(None, 0);
        let (sink, window, sel) = r.splits.first().copied().unwrap_or_default();
        md += &format!(
            "\n**~{} tokens, budget {} ({} sink + {} window + {} selected pages), {} forced steps; \
             means over {} (step, layer, KV head) samples**\n\n",
            c.prompt_tokens, c.budget, sink, window, sel, c.forced, m.steps
        );
        md += "| selection | attention mass captured | share of the oracle's | page recall vs oracle |\n|---|---|---|---|\n";
        md += "| dense (every page) | 1.000 | - | - |\n";
        md += &format!(
            "| oracle per query head (not group-consistent) | {:.3} | {:.1}% | - |\n",
            m.oracle_per_head,
            100.0 * m.oracle_per_head / m.oracle
        );
        md += &format!(
            "| **oracle** (exact mass, pooled over the group) | {:.3} | 100% | 1.000 |\n",
            m.oracle
        );
        let mut order: Vec<usize> = (0..r.estimators.len()).collect();
        order.sort_by(|&a, &b| m.mass[b].total_cmp(&m.mass[a]));
        for e in order {
            let product = product_note(e);
            md += &format!(
                "| {}{product} | {:.3} | {:.1}% | {:.3} |\n",
                r.estimators[e],
                m.mass[e],
                100.0 * m.mass[e] / m.oracle,
                m.recall[e]
            );
        }
        md += &format!(
            "| sink + window only | {:.3} | {:.1}% | - |\n",
            m.fixed,
            100.0 * m.fixed / m.oracle
        );
        // Splits.
        md += "\n| split (sink + window + selected pages) | sink + window | oracle | quest | rerank | best estimator |\n|---|---|---|---|---|---|\n";
        for (s, &(sink, window, sel)) in r.splits.iter().enumerate() {
            let m = r.means(None, s);
            let best = (0..m.mass.len()).max_by(|&a, &b| m.mass[a].total_cmp(&m.mass[b]));
            md += &format!(
                "| {sink} + {window} + {sel} | {:.3} | {:.3} | {:.3} | {:.3} | {} |\n",
                m.fixed,
                m.oracle,
                m.mass[QUEST],
                m.mass[RERANK],
                best.map_or("-".into(), |b| format!(
                    "{:.3} ({})",
                    m.mass[b], r.estimators[b]
                ))
            );
        }
        // Per layer.
        md += "\n| layer | sink + window | oracle | quest | quest recall@k | rerank | rerank recall@k |\n|---|---|---|---|---|---|---|\n";
        for l in 0..r.layers.len() {
            if r.layers[l].is_empty() {
                continue;
            }
            let m = r.means(Some(&[l]), 0);
            md += &format!(
                "| {l} | {:.3} | {:.3} | {:.3} | {:.2} | {:.3} | {:.2} |\n",
                m.fixed, m.oracle, m.mass[QUEST], m.recall[QUEST], m.mass[RERANK], m.recall[RERANK]
            );
        }
    }
    md
}

/// Attention mass captured per layer at the last cell's instance split: sink + window, the
/// oracle (pooled over the group, and per query head), today's selector and the rerank.
pub fn chart(cells: &[Cell]) -> crate::plot::Chart<'static> {
    let mut series = Vec::new();
    if let Some(c) = cells.last() {
        let r = &c.report;
        let layers: Vec<usize> = (0..r.layers.len())
            .filter(|&l| !r.layers[l].is_empty())
            .collect();
        let line =
            |label: &str, f: &dyn Fn(&freekv_plugin::probe::Means) -> f64| crate::plot::Series {
                label: label.to_string(),
                points: layers
                    .iter()
                    .map(|&l| (l as f64, f(&r.means(Some(&[l]), 0))))
                    .collect(),
            };
        series.push(line("oracle per query head", &|m| m.oracle_per_head));
        series.push(line("oracle (group)", &|m| m.oracle));
        series.push(line("rerank (new)", &|m| m.mass[RERANK]));
        series.push(line("quest (today)", &|m| m.mass[QUEST]));
        series.push(line("sink + window", &|m| m.fixed));
    }
    crate::plot::Chart {
        title: "Attention mass captured per layer (budget 1/8 of the context)",
        x_named: None,
        x_label: "layer",
        y_label: "attention mass captured",
        y_range: Some((0.0, 1.05)),
        log2_x: false,
        series,
    }
}
