//! Part 4, speed at a context, as a user of the server sees it: per path (the stock eager
//! engine, FreeKV at several budgets, FreeKV's dense mode) one `mistralrs serve`, and per
//! context length one streamed greedy chat whose prompt is real prose of that length
//! (`freekv_integration_tests::prose`), `gen_tokens` generated with the end-of-text tokens
//! banned (`logit_bias`) so every run decodes the same number of tokens.
//!
//! Timed from the client: time to first token (the prompt's prefill), then each content
//! event's arrival: decode rate = events after the first / time after the first, per-token
//! latency p50/p99 over the gaps between events. FreeKV's own figures for the request come
//! from the engine log line FreeKV writes when the request is released (its counters summed
//! over layers). Paths run one after another, shortest context first.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use freekv_integration_tests::http;
use freekv_integration_tests::load::percentile;
use freekv_integration_tests::prose::Prose;
use freekv_integration_tests::server::{streamed_answer, Server};
use freekv_plugin::{FreeKvConfig, Mode, Selector};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::variants::Variant;
use crate::Ctx;

/// SmolLM2 tokens per word of the licence prose (measured: ~1.37); prompts aim at the context
/// length through it, the table reports what the server counted.
const TOKENS_PER_WORD: f64 = 1.38;

/// SmolLM2's `<|endoftext|>` and `<|im_end|>`: banned so that decoding runs its full length.
const END_TOKENS: [u32; 2] = [0, 2];

/// What to run.
pub struct Plan {
    pub contexts: Vec<usize>,
    pub gen_tokens: usize,
    /// Requests per context and path.
    pub repeats: usize,
    pub variants: Vec<Variant>,
}

impl Plan {
    pub fn new(quick: bool) -> Self {
        if quick {
            return Self {
                contexts: vec![300],
                gen_tokens: 16,
                repeats: 1,
                variants: vec![Variant::dense(), small(128)],
            };
        }
        // FREEKV_EVAL_CONTEXTS="7680" and FREEKV_EVAL_VARIANTS="b512 t0.9,b512 t0.9 rerank x4"
        // narrow the plan; FREEKV_EVAL_REPEATS=3 sends each prompt that many times (the later
        // ones hit the prefix cache: their decode rates count, their TTFTs do not).
        let contexts = std::env::var("FREEKV_EVAL_CONTEXTS")
            .ok()
            .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect())
            .unwrap_or_else(|| vec![1024, 2048, 4096, 7680]);
        let keep: Option<Vec<String>> = std::env::var("FREEKV_EVAL_VARIANTS")
            .ok()
            .map(|v| v.split(',').map(|x| x.trim().to_string()).collect());
        let rerank = |b, shortlist| {
            Variant::freekv(b, 0.9, Mode::FreeKv).with(&format!("rerank x{shortlist}"), |c| {
                c.selector = Selector::Rerank;
                c.shortlist = shortlist;
            })
        };
        Self {
            contexts,
            gen_tokens: 64,
            repeats: std::env::var("FREEKV_EVAL_REPEATS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(1),
            variants: [
                Variant::dense(),
                Variant::freekv(256, 0.9, Mode::FreeKv),
                Variant::freekv(512, 0.9, Mode::FreeKv),
                Variant::freekv(1024, 0.9, Mode::FreeKv),
                Variant::freekv(512, 0.9, Mode::Dense),
                rerank(512, 2),
                rerank(1024, 2),
                rerank(512, 4),
                rerank(1024, 4),
            ]
            .into_iter()
            .filter(|v| keep.as_ref().is_none_or(|k| k.contains(&v.name)))
            .collect(),
        }
    }
}

/// Budget `b` with pages of 32 and a sink and window of a quarter budget each.
fn small(budget: usize) -> Variant {
    let mut v = Variant::freekv(budget, 0.9, Mode::FreeKv);
    if let Some(c) = v.config.as_mut() {
        c.sink = budget / 4;
        c.window = budget / 4;
    }
    v
}

/// One streamed request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Point {
    pub path: String,
    /// The context length aimed at.
    pub context: usize,
    /// Prompt tokens as the server counted them (chat template included).
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub ttft_s: f64,
    pub decode_tok_s: f64,
    pub token_p50_ms: f64,
    pub token_p99_ms: f64,
    /// FreeKV's release line for the request (`key=value ...`), None for the stock path.
    pub freekv: Option<String>,
    /// The same prompt sent before on this server (its prefix cached: the TTFT does not
    /// count, the decode rate does).
    #[serde(default)]
    pub warm: bool,
}

impl Point {
    /// A number from the FreeKV release line.
    pub fn counter(&self, key: &str) -> Option<f64> {
        self.freekv
            .as_deref()?
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
    }
}

/// The `--freekv-*` flags of a configuration (every knob, as the CLI spells it).
fn flags(config: &FreeKvConfig) -> Vec<String> {
    FreeKvConfig::KNOBS
        .iter()
        .flat_map(|k| [format!("--{}", k.flag), (k.show)(config)])
        .collect()
}

/// Sends one prompt of about `context` tokens and times its stream.
fn one(server: &Server, prose: &Prose, v: &Variant, context: usize, gen: usize) -> Result<Point> {
    let words = (context as f64 / TOKENS_PER_WORD) as usize;
    let prompt = format!(
        "Read the text, then continue it.\n\n{}",
        prose.words(context, words)
    );
    let bias: serde_json::Map<String, serde_json::Value> = END_TOKENS
        .iter()
        .map(|t| (t.to_string(), json!(-100.0)))
        .collect();
    let body = json!({
        "model": "default",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": gen,
        "temperature": 0.0,
        "logit_bias": bias,
        "stream": true,
    });
    let released_before = release_lines(server).len();
    let start = Instant::now();
    let mut times = Vec::new();
    let events = http::post_stream_timed(
        server.port,
        "/v1/chat/completions",
        &body,
        None,
        Duration::from_secs(3600),
        &mut |e| {
            if e["choices"][0]["delta"]["content"].is_string() {
                times.push(start.elapsed().as_secs_f64());
            }
        },
    )?;
    streamed_answer(&events)?;
    let usage = |key: &str| {
        events
            .iter()
            .rev()
            .find_map(|e| e["usage"][key].as_u64())
            .map(|n| n as usize)
    };
    let prompt_tokens = usage("prompt_tokens").context("the stream reported no usage")?;
    let completion_tokens = usage("completion_tokens").unwrap_or(times.len());
    let (first, last) = (times.first().copied(), times.last().copied());
    let (first, last) = first.zip(last).context("the stream carried no content")?;
    let mut gaps: Vec<f64> = times.windows(2).map(|w| (w[1] - w[0]) * 1e3).collect();
    gaps.sort_by(f64::total_cmp);
    // FreeKV logs the request's counters when the engine releases it, just after the stream:
    // wait for a release line beyond those of the earlier requests.
    let freekv = match v.config {
        None => None,
        Some(_) => {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                let lines = release_lines(server);
                if lines.len() > released_before || Instant::now() > deadline {
                    break lines.last().cloned();
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    };
    Ok(Point {
        path: match v.config {
            None => "stock eager".into(),
            Some(_) => v.name.clone(),
        },
        context,
        prompt_tokens,
        completion_tokens,
        ttft_s: first,
        decode_tok_s: (times.len() - 1) as f64 / (last - first).max(1e-9),
        token_p50_ms: percentile(&gaps, 0.5),
        token_p99_ms: percentile(&gaps, 0.99),
        freekv,
        warm: false,
    })
}

/// The "request ... released:" lines of the server's log, in order.
fn release_lines(server: &Server) -> Vec<String> {
    [server.log.clone(), server.log.with_extension("err")]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .flat_map(|t| {
            t.lines()
                .filter_map(|l| {
                    l.split_once(" released: ")
                        .map(|(_, r)| r.trim().to_string())
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Every path at every context.
pub fn run(cx: &Ctx, plan: &Plan) -> Result<Vec<Point>> {
    let prose = Prose::load();
    eprintln!("speed: prompts from {}", prose.source());
    let longest = plan.contexts.iter().max().copied().unwrap_or(0);
    let room = (longest * 5 / 4 + plan.gen_tokens + 512).to_string();
    let mut out = Vec::new();
    for v in &plan.variants {
        let (global, serve): (Vec<String>, Vec<&str>) = match &v.config {
            None => (vec![], vec!["--paged-attn", "off"]),
            Some(c) => (flags(c), vec!["--pa-context-len", &room]),
        };
        let global: Vec<&str> = global.iter().map(String::as_str).collect();
        let name = format!("speed-{}", v.name.replace(' ', "-"));
        let server = Server::start(&cx.mistralrs, &cx.gguf, &name, &global, &serve)?;
        for (i, &context) in plan
            .contexts
            .iter()
            .flat_map(|c| std::iter::repeat_n(c, plan.repeats))
            .enumerate()
        {
            let mut p = one(&server, &prose, v, context, plan.gen_tokens)
                .with_context(|| format!("{} at {context} tokens", v.name))?;
            p.warm = i % plan.repeats.max(1) != 0;
            eprintln!(
                "speed {:<18} {:>5} prompt tokens: first token {:.1} s, decode {:.1} tok/s (p50 {:.1} ms, p99 {:.1} ms){}",
                p.path,
                p.prompt_tokens,
                p.ttft_s,
                p.decode_tok_s,
                p.token_p50_ms,
                p.token_p99_ms,
                p.freekv.as_deref().map(|f| format!("\n  FreeKV: {f}")).unwrap_or_default()
            );
            out.push(p);
        }
    }
    Ok(out)
}

/// Markdown: per context, every path with its ratios to stock.
pub fn table(points: &[Point]) -> String {
    let mut s = String::from(
        "| context | path | prompt tokens | time to first token s | TTFT speed-up | decode tok/s | \
         decode speed-up | per-token p50 ms | p99 ms | correction rate | FreeKV blocking us/token |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let mut contexts: Vec<usize> = points.iter().map(|p| p.context).collect();
    contexts.sort_unstable();
    contexts.dedup();
    for c in contexts {
        let at: Vec<&Point> = points.iter().filter(|p| p.context == c).collect();
        let stock = at.iter().find(|p| p.freekv.is_none() && !p.warm);
        for p in &at {
            let ratio = |f: fn(&Point) -> f64, inverse: bool| match stock {
                // A warm request's TTFT is a prefix-cache hit: no ratio.
                Some(_) if inverse && p.warm => "-".into(),
                Some(s) if p.freekv.is_some() => {
                    let r = if inverse { f(s) / f(p) } else { f(p) / f(s) };
                    format!("{r:.2}x")
                }
                _ => "-".into(),
            };
            let blocking = p
                .counter("blocking_ms")
                .map(|ms| format!("{:.0}", ms * 1e3 / p.completion_tokens.max(1) as f64))
                .unwrap_or_else(|| "-".into());
            let correction = p
                .counter("correction_rate")
                .map(|r| format!("{r:.3}"))
                .unwrap_or_else(|| "-".into());
            s += &format!(
                "| {c} | {}{} | {} | {:.1} | {} | {:.1} | {} | {:.1} | {:.1} | {correction} | {blocking} |\n",
                p.path,
                if p.warm { " (again)" } else { "" },
                p.prompt_tokens,
                p.ttft_s,
                ratio(|p| p.ttft_s, true),
                p.decode_tok_s,
                ratio(|p| p.decode_tok_s, false),
                p.token_p50_ms,
                p.token_p99_ms,
            );
        }
    }
    s
}

fn series(points: &[Point], y: fn(&Point) -> f64) -> Vec<crate::plot::Series> {
    let mut paths: Vec<&str> = Vec::new();
    for p in points {
        if !paths.contains(&p.path.as_str()) {
            paths.push(&p.path);
        }
    }
    paths
        .iter()
        .map(|name| crate::plot::Series {
            label: name.to_string(),
            points: points
                .iter()
                .filter(|p| p.path == *name)
                .map(|p| (p.prompt_tokens as f64, y(p)))
                .collect(),
        })
        .collect()
}

/// Decode latency per token (p50) vs context, per path.
pub fn decode_chart(points: &[Point]) -> crate::plot::Chart<'static> {
    crate::plot::Chart {
        title: "Decode latency vs context, SmolLM2-135M on 2 CPU cores (mistralrs serve)",
        x_named: None,
        x_label: "prompt tokens (log scale)",
        y_label: "ms per generated token (p50)",
        y_range: None,
        log2_x: true,
        series: series(points, |p| p.token_p50_ms),
    }
}

/// Time to first token vs context, per path.
pub fn ttft_chart(points: &[Point]) -> crate::plot::Chart<'static> {
    crate::plot::Chart {
        title: "Time to first token vs context, SmolLM2-135M on 2 CPU cores (mistralrs serve)",
        x_named: None,
        x_label: "prompt tokens (log scale)",
        y_label: "seconds to the first token",
        y_range: None,
        log2_x: true,
        series: series(points, |p| p.ttft_s),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_spell_every_knob_and_parse_back() {
        let v = Variant::freekv(512, 0.8, Mode::Sync);
        let config = v.config.unwrap();
        let f = flags(&config);
        assert_eq!(f.len(), 2 * FreeKvConfig::KNOBS.len());
        assert!(f
            .windows(2)
            .any(|w| w[0] == "--freekv-budget" && w[1] == "512"));
        assert!(f
            .windows(2)
            .any(|w| w[0] == "--freekv-mode" && w[1] == "sync"));
        // What the CLI would read back is the same configuration.
        let mut back = FreeKvConfig::default();
        for (k, pair) in FreeKvConfig::KNOBS.iter().zip(f.chunks(2)) {
            (k.set)(&mut back, &pair[1]).unwrap();
        }
        assert_eq!(back, config);
    }

    #[test]
    fn release_line_counters_parse() {
        let p = Point {
            path: "b512 t0.9".into(),
            context: 1024,
            prompt_tokens: 1030,
            completion_tokens: 64,
            ttft_s: 1.0,
            decode_tok_s: 40.0,
            token_p50_ms: 25.0,
            token_p99_ms: 30.0,
            freekv: Some("prefill_tokens=3570 correction_rate=0.605 blocking_ms=0.41".into()),
            warm: false,
        };
        assert_eq!(p.counter("correction_rate"), Some(0.605));
        assert_eq!(p.counter("blocking_ms"), Some(0.41));
        assert_eq!(p.counter("rate"), None);
    }
}
