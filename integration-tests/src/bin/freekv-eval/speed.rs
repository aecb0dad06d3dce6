//! Part 4, speed through the engine: `mistralrs bench` (the engine's own benchmark, the
//! binary built from this workspace) with the stock eager path and with FreeKV, side by side
//! per prompt length, in one run.

use std::process::Command;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::Ctx;

/// What to run.
pub struct Plan {
    pub prompt_lengths: Vec<usize>,
    pub gen_len: usize,
    pub budget: usize,
}

impl Plan {
    pub fn new(quick: bool) -> Self {
        if quick {
            Self {
                prompt_lengths: vec![256],
                gen_len: 16,
                budget: 128,
            }
        } else {
            Self {
                prompt_lengths: vec![512, 1024, 2048, 4096],
                gen_len: 64,
                budget: 512,
            }
        }
    }
}

/// One `mistralrs bench` result.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Bench {
    pub path: String,
    pub prompt_len: usize,
    pub prefill_tok_s: f64,
    pub ttft_ms: f64,
    pub decode_tok_s: f64,
    pub decode_ms_per_token: f64,
}

/// Parses the engine's results table: the `Prefill (...)` and `Decode (...)` rows.
fn parse(out: &str) -> Option<(f64, f64, f64, f64)> {
    let row = |name: &str| -> Option<(f64, f64)> {
        let line = out.lines().find(|l| l.contains(name))?;
        let cells: Vec<&str> = line
            .split(['│', '┆'])
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .collect();
        let rate = cells.get(1)?.split_whitespace().next()?.parse().ok()?;
        let latency = cells.get(2)?.split_whitespace().next()?.parse().ok()?;
        Some((rate, latency))
    };
    let (p, ttft) = row("Prefill (")?;
    let (d, ms) = row("Decode (")?;
    Some((p, ttft, d, ms))
}

fn bench(cx: &Ctx, plan: &Plan, prompt_len: usize, freekv: bool) -> Result<Bench> {
    let dir = cx.gguf.parent().context("GGUF path has no folder")?;
    let file = cx.gguf.file_name().context("GGUF path has no file name")?;
    let mut cmd = Command::new(&cx.mistralrs);
    if freekv {
        let edge = (plan.budget / 4).min(128).to_string();
        cmd.args(["--freekv-budget", &plan.budget.to_string()])
            .args(["--freekv-sink", &edge, "--freekv-window", &edge]);
    }
    let context = (prompt_len + plan.gen_len + 128).to_string();
    cmd.args(["--token-source", "none", "bench", "--format", "gguf", "-m"])
        .arg(dir)
        .arg("-f")
        .arg(file)
        .args(["--cpu", "--paged-attn", if freekv { "on" } else { "off" }])
        .args(["--pa-context-len", &context])
        .args(["--prompt-len", &prompt_len.to_string()])
        .args(["--gen-len", &plan.gen_len.to_string()])
        .args(["--iterations", "1", "--warmup", "0"]);
    let out = cmd
        .output()
        .with_context(|| format!("running {}", cx.mistralrs.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    anyhow::ensure!(
        out.status.success(),
        "mistralrs bench failed ({}): {}",
        out.status,
        stderr.lines().rev().take(5).collect::<Vec<_>>().join(" | ")
    );
    let (prefill_tok_s, ttft_ms, decode_tok_s, decode_ms_per_token) = parse(&stdout)
        .or_else(|| parse(&stderr))
        .context("no results table in the output of mistralrs bench")?;
    Ok(Bench {
        path: if freekv {
            format!("FreeKV b{}", plan.budget)
        } else {
            "stock eager".into()
        },
        prompt_len,
        prefill_tok_s,
        ttft_ms,
        decode_tok_s,
        decode_ms_per_token,
    })
}

/// Stock then FreeKV at every prompt length.
pub fn run(cx: &Ctx, plan: &Plan) -> Result<Vec<Bench>> {
    let mut out = Vec::new();
    for &n in &plan.prompt_lengths {
        for freekv in [false, true] {
            let b = bench(cx, plan, n, freekv)?;
            eprintln!(
                "speed {:<12} prompt {n:>5}: prefill {:.1} tok/s ({:.0} ms), decode {:.1} tok/s ({:.2} ms/token)",
                b.path, b.prefill_tok_s, b.ttft_ms, b.decode_tok_s, b.decode_ms_per_token
            );
            out.push(b);
        }
    }
    Ok(out)
}

/// Markdown: side by side per prompt length, with FreeKV/stock ratios.
pub fn table(rows: &[Bench]) -> String {
    let mut s = String::from(
        "| prompt tokens | stock prefill tok/s | FreeKV prefill tok/s | prefill time FreeKV/stock | \
         stock decode tok/s | FreeKV decode tok/s | decode speed-up |\n|---|---|---|---|---|---|---|\n",
    );
    for pair in rows.chunks(2) {
        if let [a, b] = pair {
            s += &format!(
                "| {} | {:.1} | {:.1} | {:.2}x | {:.1} | {:.1} | {:.2}x |\n",
                a.prompt_len,
                a.prefill_tok_s,
                b.prefill_tok_s,
                b.ttft_ms / a.ttft_ms,
                a.decode_tok_s,
                b.decode_tok_s,
                b.decode_tok_s / a.decode_tok_s
            );
        }
    }
    s
}

/// Decode latency per token vs prompt length, stock vs FreeKV.
pub fn chart(rows: &[Bench]) -> crate::plot::Chart<'static> {
    let mut paths: Vec<&str> = Vec::new();
    for r in rows {
        if !paths.contains(&r.path.as_str()) {
            paths.push(&r.path);
        }
    }
    let series = paths
        .iter()
        .map(|p| crate::plot::Series {
            label: p.to_string(),
            points: rows
                .iter()
                .filter(|r| r.path == *p)
                .map(|r| (r.prompt_len as f64, r.decode_ms_per_token))
                .collect(),
        })
        .collect();
    crate::plot::Chart {
        title: "Decode latency vs context, SmolLM2-135M on CPU (mistralrs bench)",
        x_named: None,
        x_label: "prompt tokens (log scale)",
        y_label: "ms per generated token",
        y_range: None,
        log2_x: true,
        series,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_the_engine_table() {
        let out = "│ Prefill (512 tokens) ┆ 56.3 ± 0.0 ┆ 9097.11 ms (TTFT) │\n\
                   ├╌╌╌┤\n│ Decode (32 tokens)   ┆ 41.8 ± 0.0 ┆ 23.89 ms/T        │\n";
        assert_eq!(super::parse(out), Some((56.3, 9097.11, 41.8, 23.89)));
        assert_eq!(super::parse("no table"), None);
    }
}
