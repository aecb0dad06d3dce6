//! `freekv-eval`: accuracy and speed of FreeKV vs dense attention on SmolLM2-135M-Instruct,
//! through the engine as users run it (the Rust SDK and the engine's server).
//!
//! ```text
//! freekv-eval <passkey|retrieval|selection|needles|agreement|tuning|speed|load|batching|all|plots> [--quick] [--out DIR] [--gguf FILE] [--mistralrs BIN]
//! ```
//!
//! `plots` redraws the PNGs from the JSON files already in the output folder.
//!
//! Each part writes `<part>.json` (every measurement), `<part>.md` (tables) and PNG plots into
//! the output folder (default `docs/results`, or `target/eval-smoke` with `--quick`).
//! `cargo xtask eval <part>` builds what it needs and runs it; `--quick` is the minutes-long
//! smoke variant that `cargo xtask test` runs.

mod agreement;
mod batching;
mod load;
mod needles;
mod passkey;
mod plot;
mod retrieval;
mod selection;
mod speed;
mod variants;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use freekv_integration_tests::paths;

/// Where things are and how much to run.
pub struct Ctx {
    pub gguf: PathBuf,
    pub mistralrs: PathBuf,
    pub out: PathBuf,
    pub quick: bool,
}

const USAGE: &str =
    "usage: freekv-eval <passkey|retrieval|selection|needles|agreement|tuning|speed|load|batching|all|plots> [--quick] [--out DIR] \
                     [--gguf FILE] [--mistralrs BIN]";

fn parse_args() -> Result<(Vec<String>, Ctx)> {
    let mut parts = Vec::new();
    let (mut quick, mut out, mut gguf, mut bin) = (false, None, None, None);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| args.next().with_context(|| format!("{name} needs a value"));
        match a.as_str() {
            "--quick" => quick = true,
            "--out" => out = Some(PathBuf::from(value("--out")?)),
            "--gguf" => gguf = Some(PathBuf::from(value("--gguf")?)),
            "--mistralrs" => bin = Some(PathBuf::from(value("--mistralrs")?)),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            "passkey" | "retrieval" | "selection" | "needles" | "agreement" | "tuning"
            | "speed" | "load" | "batching" | "plots" => parts.push(a),
            "all" => parts.extend(
                [
                    "passkey",
                    "retrieval",
                    "selection",
                    "needles",
                    "agreement",
                    "tuning",
                    "speed",
                    "load",
                    "batching",
                ]
                .map(String::from),
            ),
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    if parts.is_empty() {
        bail!("no part given\n{USAGE}");
    }
    let out = out.unwrap_or_else(|| {
        if quick {
            PathBuf::from("target/eval-smoke")
        } else {
            PathBuf::from("docs/results")
        }
    });
    let gguf = match gguf {
        Some(g) => g,
        None => paths::smollm2_gguf()?,
    };
    let mistralrs = match bin {
        Some(b) => b,
        None => paths::mistralrs_bin()?,
    };
    Ok((
        parts,
        Ctx {
            gguf,
            mistralrs,
            out,
            quick,
        },
    ))
}

fn write(dir: &Path, name: &str, contents: &str) -> Result<()> {
    let path = dir.join(name);
    std::fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

fn json<T: serde::Serialize>(value: &T) -> Result<String> {
    Ok(serde_json::to_string_pretty(value)?)
}

fn draw(cx: &Ctx, name: &str, chart: &plot::Chart) -> Result<()> {
    if !plot::available() && cx.quick {
        eprintln!("no system font: {name} not drawn (smoke run)");
        return Ok(());
    }
    let path = cx.out.join(name);
    plot::draw(&path, chart)?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

fn read_json<T: serde::de::DeserializeOwned>(cx: &Ctx, name: &str) -> Result<Option<T>> {
    let path = cx.out.join(name);
    if !path.exists() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(Some(
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?,
    ))
}

fn draw_agreement(cx: &Ctx, outcomes: &[agreement::Outcome]) -> Result<()> {
    draw(
        cx,
        "correction-by-layer.png",
        &agreement::correction_chart(outcomes),
    )?;
    draw(
        cx,
        "agreement-vs-budget.png",
        &agreement::agreement_chart(outcomes),
    )
}

/// Redraws every plot from the JSON results in the output folder.
fn replot(cx: &Ctx) -> Result<()> {
    if let Some(trials) = read_json::<Vec<passkey::Trial>>(cx, "passkey.json")? {
        draw(cx, "passkey-accuracy.png", &passkey::chart(&trials))?;
    }
    if let Some(trials) = read_json::<Vec<retrieval::Trial>>(cx, "retrieval.json")? {
        draw(cx, "retrieval-accuracy.png", &retrieval::chart(&trials))?;
    }
    if let Some(cells) = read_json::<Vec<selection::Cell>>(cx, "selection.json")? {
        draw(cx, "selection-by-layer.png", &selection::chart(&cells))?;
    }
    if let Some(outcomes) = read_json::<Vec<agreement::Outcome>>(cx, "tuning.json")? {
        draw(
            cx,
            "kl-vs-correction-rate.png",
            &agreement::correction_chart_kl(&outcomes),
        )?;
    }
    if let Some(outcomes) = read_json::<Vec<agreement::Outcome>>(cx, "agreement.json")? {
        draw_agreement(cx, &outcomes)?;
    }
    if let Some(points) = read_json::<Vec<speed::Point>>(cx, "speed.json")? {
        draw(cx, "decode-latency.png", &speed::decode_chart(&points))?;
        draw(cx, "ttft.png", &speed::ttft_chart(&points))?;
    }
    Ok(())
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cpu}, {cores} hardware threads")
}

async fn run(parts: &[String], cx: &Ctx) -> Result<()> {
    std::fs::create_dir_all(&cx.out).with_context(|| format!("creating {}", cx.out.display()))?;
    let header = |part: &str, secs: f64| {
        format!(
            "<!-- written by freekv-eval {part}{}; {}; {secs:.0} s -->\n\n",
            if cx.quick { " --quick" } else { "" },
            machine()
        )
    };
    for part in parts {
        let t = std::time::Instant::now();
        match part.as_str() {
            "passkey" => {
                let trials = passkey::run(cx, &passkey::Plan::new(cx.quick)).await?;
                write(&cx.out, "passkey.json", &json(&trials)?)?;
                let md = header(part, t.elapsed().as_secs_f64()) + &passkey::table(&trials);
                write(&cx.out, "passkey.md", &md)?;
                println!("{md}");
                draw(cx, "passkey-accuracy.png", &passkey::chart(&trials))?;
                let (dense, fkv): (Vec<_>, Vec<_>) =
                    trials.iter().partition(|t| t.variant == "dense");
                anyhow::ensure!(!dense.is_empty() && !fkv.is_empty(), "passkey ran no trial");
            }
            "retrieval" => {
                let plan = retrieval::Plan::new(cx.quick);
                let (trials, traces) = retrieval::run(cx, &plan).await?;
                write(&cx.out, "retrieval.json", &json(&trials)?)?;
                write(&cx.out, "retrieval-traces.json", &json(&traces)?)?;
                let mut md = header(part, t.elapsed().as_secs_f64());
                md += &format!(
                    "Prompt: {} with the needles; the question is then teacher forced one decode \
                     step at a time and the answer generated greedily (SmolLM2-135M-Instruct, \
                     Q4_1, the engine's automatic dtype on the CPU). Per length one model, FreeKV \
                     at a budget of 1/8 of the context (a quarter of it, at most 128 tokens, each \
                     for sink and window); each trial's prompt prefilled once and answered under \
                     every arm (switched between requests; the prefix cache serves the prompt). \
                     Arms: dense = FreeKV's dense mode; oracle = pages by exact attention mass of \
                     the current query (mode sync); quest = today's selector, rerank xN = the new one shortlisting N pages per \
                     selected page (4 by default; all mode freekv, tau 0.9). {} \
                     paired trials per task and length, the asked needle at depths 10-90%.\n",
                    freekv_integration_tests::prose::Prose::load().source(),
                    plan.trials
                );
                md += &retrieval::table(&trials);
                if !traces.is_empty() {
                    md += "\n### Needle traces of failing trials\n";
                    md += &retrieval::traces(&traces);
                }
                write(&cx.out, "retrieval.md", &md)?;
                println!("{md}");
                draw(cx, "retrieval-accuracy.png", &retrieval::chart(&trials))?;
                for t in &trials {
                    // The question and answer must have gone through the sparse path.
                    let sparse =
                        t.variant != "dense" && t.budget.is_some_and(|b| t.prompt_tokens > b);
                    anyhow::ensure!(
                        !sparse || t.sparse_steps > 0,
                        "{} on {:?}: the question was never decoded sparsely",
                        t.variant,
                        t.task
                    );
                }
            }
            "selection" => {
                let plan = selection::Plan::new(cx.quick);
                let cells = selection::run(cx, &plan).await?;
                write(&cx.out, "selection.json", &json(&cells)?)?;
                let mut md = header(part, t.elapsed().as_secs_f64());
                md += &format!(
                    "Prompt: {} (raw tokens), then {} tokens of its continuation teacher forced; \
                     FreeKV in mode dense (the dense model's queries) with the selection probe \
                     (SmolLM2-135M-Instruct, Q4_1, f16 on the CPU). Budgets 1/8 of the context.\n",
                    freekv_integration_tests::prose::Prose::load().source(),
                    plan.forced
                );
                md += &selection::tables(&cells);
                write(&cx.out, "selection.md", &md)?;
                println!("{md}");
                draw(cx, "selection-by-layer.png", &selection::chart(&cells))?;
                for c in &cells {
                    anyhow::ensure!(
                        c.report.means(None, 0).steps > 0,
                        "selection: nothing probed at ~{} tokens",
                        c.prompt_tokens
                    );
                }
            }
            "needles" => {
                let cells = needles::run(cx).await?;
                write(&cx.out, "needles.json", &json(&cells)?)?;
                let mut md = header(part, t.elapsed().as_secs_f64());
                md += "The retrieval part's single-key cases (question teacher forced, 12 answer \
                       tokens), FreeKV in mode dense (the dense model's queries) with the selection \
                       probe watching the asked needle's pages (SmolLM2-135M-Instruct, Q4_1, f16 on \
                       the CPU). Budgets 1/8 of the context, sink and window a quarter of it each \
                       (at most 128 tokens).\n";
                md += &needles::table(&cells);
                write(&cx.out, "needles.md", &md)?;
                println!("{md}");
                anyhow::ensure!(
                    cells.iter().all(|c| c.samples > 0),
                    "needles: nothing probed"
                );
            }
            "tuning" => {
                let plan = agreement::Plan::tuning(cx.quick);
                let outcomes = agreement::run(cx, &plan).await?;
                write(&cx.out, "tuning.json", &json(&outcomes)?)?;
                let mut md = header(part, t.elapsed().as_secs_f64());
                md += &format!(
                    "Settings at budget 512, teacher forced as in the agreement part ({} prompt \
                     tokens of GPL-3, then {} forced steps).\n\n",
                    plan.prompt_tokens, plan.forced_tokens
                );
                md += &agreement::tables(&outcomes);
                write(&cx.out, "tuning.md", &md)?;
                println!("{md}");
                draw(
                    cx,
                    "kl-vs-correction-rate.png",
                    &agreement::correction_chart_kl(&outcomes),
                )?;
                for o in &outcomes {
                    anyhow::ensure!(o.mean_kl.is_finite(), "{}: KL is not finite", o.variant);
                    anyhow::ensure!(o.total.sparse_steps > 0, "{}: never went sparse", o.variant);
                }
            }
            "agreement" => {
                let plan = agreement::Plan::new(cx.quick);
                let outcomes = agreement::run(cx, &plan).await?;
                write(&cx.out, "agreement.json", &json(&outcomes)?)?;
                let mut md = header(part, t.elapsed().as_secs_f64());
                md += &format!(
                    "Teacher forced: {} prompt tokens of /usr/share/common-licenses/GPL-3, then {} \
                     forced decode steps compared with dense.\n\n",
                    plan.prompt_tokens, plan.forced_tokens
                );
                md += &agreement::tables(&outcomes);
                if let Some(o) = outcomes.iter().find(|o| o.total.heads_checked > 0) {
                    md += "\n";
                    md += &agreement::similarity_table(o);
                }
                write(&cx.out, "agreement.md", &md)?;
                println!("{md}");
                draw_agreement(cx, &outcomes)?;
                for o in &outcomes {
                    anyhow::ensure!(
                        o.steps == plan.forced_tokens,
                        "{}: compared {} of {} forced steps",
                        o.variant,
                        o.steps,
                        plan.forced_tokens
                    );
                    anyhow::ensure!(o.mean_kl.is_finite(), "{}: KL is not finite", o.variant);
                    // With the same f32 weights on both paths, FreeKV attending over every
                    // page must give the stock model's tokens (up to summation order).
                    let reference = o.precision == agreement::Precision::F32
                        && o.mode == freekv_plugin::Mode::Dense
                        && std::env::var_os(DEQUANTIZE).is_some();
                    anyhow::ensure!(
                        !reference || o.top1_agreement >= 0.99,
                        "{}: FreeKV dense mode agrees with stock on only {:.2}% of f32 steps",
                        o.variant,
                        100.0 * o.top1_agreement
                    );
                    anyhow::ensure!(
                        o.mode == freekv_plugin::Mode::Dense || o.total.sparse_steps > 0,
                        "{}: never went sparse",
                        o.variant
                    );
                }
            }
            "speed" => {
                let points = speed::run(cx, &speed::Plan::new(cx.quick))?;
                write(&cx.out, "speed.json", &json(&points)?)?;
                let md = header(part, t.elapsed().as_secs_f64()) + &speed::table(&points);
                write(&cx.out, "speed.md", &md)?;
                println!("{md}");
                draw(cx, "decode-latency.png", &speed::decode_chart(&points))?;
                draw(cx, "ttft.png", &speed::ttft_chart(&points))?;
            }
            "load" => {
                let plan = load::Plan::new(cx.quick);
                let runs = load::run(cx, &plan)?;
                write(&cx.out, "load.json", &json(&runs)?)?;
                let mut md = header(part, t.elapsed().as_secs_f64());
                md += &format!(
                    "{} streaming chats, every {}th abandoned after three events, {} completion \
                     tokens each, prompts of {}-{} units of filler text (~0.62 SmolLM2 tokens each); `mistralrs serve` on this CPU.\n\n",
                    plan.load.streams,
                    plan.load.cancel_every,
                    plan.load.max_tokens,
                    plan.load.min_words,
                    plan.load.min_words + plan.load.span_words
                );
                md += &load::table(&runs);
                write(&cx.out, "load.md", &md)?;
                println!("{md}");
                let fkv = &runs[0];
                anyhow::ensure!(
                    fkv.completed == fkv.expected && fkv.failed == 0,
                    "FreeKV under load: {} of {} streams completed",
                    fkv.completed,
                    fkv.expected
                );
                anyhow::ensure!(
                    fkv.idle_sequences == Some(0.0),
                    "FreeKV state not back to idle after the load: {:?}",
                    fkv.idle_sequences
                );
            }
            "batching" => {
                let plan = batching::Plan::new(cx.quick);
                let runs = batching::run(cx, &plan)?;
                write(&cx.out, "batching.json", &json(&runs)?)?;
                let mut md = header(part, t.elapsed().as_secs_f64());
                md += &format!(
                    "{} streaming chats with prompts of {}-{} units of filler text (~0.62 SmolLM2 tokens each) and {} completion \
                     tokens each, sent all at once and (the first {}) one at a time; FreeKV \
                     budget 128 through `mistralrs serve` on this CPU.\n\n",
                    plan.concurrent.streams,
                    plan.concurrent.min_words,
                    plan.concurrent.min_words + plan.concurrent.span_words,
                    plan.concurrent.max_tokens,
                    plan.single_streams
                );
                md += &batching::table(&runs);
                write(&cx.out, "batching.md", &md)?;
                println!("{md}");
                anyhow::ensure!(
                    runs.iter().all(|r| r.completed == r.streams),
                    "batching: not every stream completed: {runs:?}"
                );
            }
            "plots" => replot(cx)?,
            other => bail!("unknown part {other}"),
        }
        eprintln!("{part}: {:.0} s", t.elapsed().as_secs_f64());
    }
    Ok(())
}

/// candle's switch that dequantizes GGUF weights to plain f32 matrices at load (read once per
/// thread, so it must be set before any model loads).
const DEQUANTIZE: &str = "CANDLE_DEQUANTIZE_ALL";

/// Runs each part in a child process of this binary with the same flags, so that one part's
/// process-wide settings (the agreement part's [`DEQUANTIZE`]) never reach another.
fn run_in_children(parts: &[String]) -> Result<()> {
    let exe = std::env::current_exe().context("locating freekv-eval")?;
    let flags: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !parts.contains(a) && a != "all")
        .collect();
    for part in parts {
        let status = std::process::Command::new(&exe)
            .arg(part)
            .args(&flags)
            .status()
            .with_context(|| format!("running freekv-eval {part}"))?;
        anyhow::ensure!(status.success(), "freekv-eval {part} failed ({status})");
    }
    Ok(())
}

fn main() {
    let result = parse_args().and_then(|(parts, cx)| {
        if parts.len() > 1 {
            return run_in_children(&parts);
        }
        if matches!(parts[0].as_str(), "agreement" | "tuning")
            && std::env::var_os(DEQUANTIZE).is_none()
        {
            // Stock and FreeKV then multiply with the same f32 weights in plain f32: the Q4_1
            // matmuls re-quantize activations to 8 bits, which turns last-bit differences of
            // the attention sums into different tokens (docs/results.md, section 2).
            std::env::set_var(DEQUANTIZE, "1");
        }
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("tokio runtime")?
            .block_on(run(&parts, &cx))
    });
    if let Err(e) = result {
        eprintln!("freekv-eval: error: {e:#}");
        std::process::exit(1);
    }
}
