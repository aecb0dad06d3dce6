//! The retrieval tables (accuracy with one standard error per arm, length and task; paired
//! differences between arms), the needle traces and the accuracy chart.

use super::{NeedleTrace, Task, Trial};

/// Accuracy and its standard error over `trials`.
fn accuracy(trials: &[&Trial]) -> (f64, f64) {
    let n = trials.len().max(1) as f64;
    let p = trials.iter().filter(|t| t.correct).count() as f64 / n;
    (p, (p * (1.0 - p) / n).sqrt())
}

/// The mean paired difference `a - b` (1 per trial one got right and the other not) over the
/// trials both arms ran, with its standard error.
fn paired(a: &[&Trial], b: &[&Trial]) -> Option<(f64, f64, usize)> {
    let d: Vec<f64> = a
        .iter()
        .filter_map(|x| {
            b.iter()
                .find(|y| y.trial == x.trial)
                .map(|y| x.correct as u8 as f64 - y.correct as u8 as f64)
        })
        .collect();
    let n = d.len();
    if n < 2 {
        return None;
    }
    let mean = d.iter().sum::<f64>() / n as f64;
    let var = d.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    Some((mean, (var / n as f64).sqrt(), n))
}

fn names<T: PartialEq + Clone>(items: impl Iterator<Item = T>) -> Vec<T> {
    let mut out: Vec<T> = Vec::new();
    for x in items {
        if !out.contains(&x) {
            out.push(x);
        }
    }
    out
}

/// Markdown: per task, accuracy ± one standard error per arm and length (budget in the
/// heading); then paired differences of every arm against dense and against the oracle.
pub fn table(trials: &[Trial]) -> String {
    let arms = names(trials.iter().map(|t| t.variant.clone()));
    let mut cells = names(
        trials
            .iter()
            .map(|t| (t.target_tokens, t.budget.unwrap_or(0))),
    );
    cells.sort_unstable();
    let mut md = String::new();
    let select = |task: Task, arm: &str, cell: (usize, usize)| -> Vec<&Trial> {
        trials
            .iter()
            .filter(|t| {
                t.task == task
                    && t.variant == arm
                    && (t.target_tokens, t.budget.unwrap_or(0)) == cell
            })
            .collect()
    };
    for task in Task::ALL {
        if !trials.iter().any(|t| t.task == task) {
            continue;
        }
        md += &format!("\n**{}**\n\n| arm |", task.name());
        for (l, b) in &cells {
            md += &format!(" ~{l} tokens, budget {b} |");
        }
        md += "\n|---|";
        md += &"---|".repeat(cells.len());
        md += "\n";
        for arm in &arms {
            md += &format!("| {arm} |");
            for &c in &cells {
                let cell = select(task, arm, c);
                let (p, se) = accuracy(&cell);
                md += &format!(
                    " {:.0}% ± {:.0} (n={}) |",
                    100.0 * p,
                    100.0 * se,
                    cell.len()
                );
            }
            md += "\n";
        }
        md += "\n| paired difference (percentage points ± SE) |";
        for (l, _) in &cells {
            md += &format!(" ~{l} |");
        }
        md += "\n|---|";
        md += &"---|".repeat(cells.len());
        md += "\n";
        for reference in ["dense", "oracle"] {
            for arm in arms
                .iter()
                .filter(|a| *a != reference && !(reference == "oracle" && *a == "dense"))
            {
                md += &format!("| {arm} - {reference} |");
                for &c in &cells {
                    md += &match paired(&select(task, arm, c), &select(task, reference, c)) {
                        Some((m, se, _)) => format!(
                            " {:+.0} ± {:.0}{} |",
                            100.0 * m,
                            100.0 * se,
                            if m < -se { " *" } else { "" }
                        ),
                        None => " - |".into(),
                    };
                }
                md += "\n";
            }
        }
    }
    md += "\n\\* more than one standard error below the reference (paired over the same trials).\n";
    md
}

/// Markdown: each traced failure, step by step.
pub fn traces(traces: &[NeedleTrace]) -> String {
    let mut md = String::new();
    for t in traces {
        md += &format!(
            "\n**{} at ~{} tokens, trial {}, {}**: expected {:?}, answered {:?}; needle in pages {:?}, {} selected pages per KV head\n\n",
            t.task.name(),
            t.target_tokens,
            t.trial,
            t.variant,
            t.expected,
            t.answer,
            t.needle_pages,
            t.selected_pages
        );
        md += "| step (context) | (layer, head) pairs attending the needle | pairs whose oracle selects it | median rank (selector) | median rank (oracle) | needle mass |\n|---|---|---|---|---|---|\n";
        for s in &t.steps {
            md += &format!(
                "| {} | {} / {} | {} | {:.0} | {:.0} | {:.3} |\n",
                s.len,
                s.attended,
                s.pairs,
                s.oracle_selects,
                s.median_rank,
                s.median_oracle_rank,
                s.mass
            );
        }
    }
    md
}

/// Accuracy vs prompt length per arm (tasks pooled).
pub fn chart(trials: &[Trial]) -> crate::plot::Chart<'static> {
    let arms = names(trials.iter().map(|t| t.variant.clone()));
    let series = arms
        .iter()
        .map(|arm| {
            let mut cells = std::collections::BTreeMap::<usize, (usize, usize)>::new();
            for t in trials.iter().filter(|t| &t.variant == arm) {
                let c = cells.entry(t.target_tokens).or_default();
                c.0 += t.correct as usize;
                c.1 += 1;
            }
            crate::plot::Series {
                label: arm.clone(),
                points: cells
                    .iter()
                    .map(|(&x, &(ok, n))| (x as f64, ok as f64 / n as f64))
                    .collect(),
            }
        })
        .collect();
    crate::plot::Chart {
        title: "Retrieval accuracy at a budget of 1/8 of the context (question decoded sparsely)",
        x_named: None,
        x_label: "prompt tokens (log scale)",
        y_label: "accuracy",
        y_range: Some((0.0, 1.05)),
        log2_x: true,
        series,
    }
}
