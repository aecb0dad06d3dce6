//! The main job: a passkey hidden in a ~2,000-token document, found by SmolLM2-135M through
//! the engine's own CLI (`mistralrs run`) with FreeKV attending over a 512-token budget.
//!
//! `cargo xtask demo` builds everything and runs this program; by hand:
//!
//! ```text
//! target/release/examples/passkey_cli --mistralrs target/release/mistralrs \
//!     --gguf .cache/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf [--tokens 2000] [--depth 0.3]
//!     [--budget 512] [--compare-stock] [-- <extra mistralrs flags>]
//! ```
//!
//! It prints the exact command it runs, the engine's output (with FreeKV's counters, logged
//! when the request finishes) and whether the answer holds the hidden key.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use freekv_examples::passkey::{is_correct, passkey};

struct Args {
    mistralrs: PathBuf,
    gguf: PathBuf,
    tokens: usize,
    depth: f64,
    budget: usize,
    compare_stock: bool,
    extra: Vec<String>,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        mistralrs: PathBuf::from("target/release/mistralrs"),
        gguf: PathBuf::from(".cache/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
        tokens: 2000,
        depth: 0.3,
        budget: 512,
        compare_stock: false,
        extra: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().with_context(|| format!("{name} needs a value"));
        match a.as_str() {
            "--mistralrs" => args.mistralrs = value("--mistralrs")?.into(),
            "--gguf" => args.gguf = value("--gguf")?.into(),
            "--tokens" => args.tokens = value("--tokens")?.parse().context("--tokens")?,
            "--depth" => args.depth = value("--depth")?.parse().context("--depth")?,
            "--budget" => args.budget = value("--budget")?.parse().context("--budget")?,
            "--compare-stock" => args.compare_stock = true,
            "--" => args.extra.extend(it.by_ref()),
            other => bail!("unknown argument `{other}` (see the doc comment of passkey_cli.rs)"),
        }
    }
    if !(0.0..=1.0).contains(&args.depth) {
        bail!("--depth {} is outside [0, 1]", args.depth);
    }
    Ok(args)
}

/// Runs `mistralrs run` on the prompt; returns everything it printed.
fn run_cli(args: &Args, prompt: &str, freekv: bool) -> Result<String> {
    let dir = args.gguf.parent().context("--gguf has no parent folder")?;
    let file = args.gguf.file_name().context("--gguf has no file name")?;
    let mut cmd = Command::new(&args.mistralrs);
    if freekv {
        // 512 = 128 sink + 128 window + 8 selected pages of 32: the long-input setting.
        let selected = args.budget.saturating_sub(256);
        cmd.args(["--freekv-budget", &args.budget.to_string()])
            .args(["--freekv-sink", "128", "--freekv-window", "128"])
            .args(["--freekv-tau", "0.8"]);
        eprintln!(
            "FreeKV budget {} tokens: 128 sink + 128 window + {selected} selected",
            args.budget
        );
    }
    cmd.args(["--token-source", "none", "run", "--format", "gguf", "-m"])
        .arg(dir)
        .arg("-f")
        .arg(file)
        .args(["--cpu", "--pa-context-len", "8192"])
        .args(["--paged-attn", if freekv { "on" } else { "off" }])
        .args(&args.extra)
        .arg("-i")
        .arg(prompt);
    let shown: Vec<String> = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .map(|a| {
            if a.len() > 80 {
                format!("\"<{} characters>\"", a.len())
            } else {
                a
            }
        })
        .collect();
    eprintln!("\n$ {}\n", shown.join(" "));
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start {}", args.mistralrs.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        bail!("mistralrs failed ({}):\n{stdout}\n{stderr}", out.status);
    }
    // The engine logs to stdout too: show its FreeKV lines, then the answer and its stats.
    for line in stdout.lines().map(strip_ansi) {
        if line.contains("FreeKV") {
            println!("  {}", line.trim());
        }
    }
    let answer = one_shot_answer(&stdout);
    println!("\n{answer}");
    Ok(answer)
}

/// The text `mistralrs run -i` printed between "running one-shot mode..." and its stats.
fn one_shot_answer(stdout: &str) -> String {
    let mut lines = stdout.lines().map(strip_ansi);
    let mut answer = Vec::new();
    for line in lines.by_ref() {
        if line.contains("running one-shot mode") {
            break;
        }
    }
    for line in lines {
        if line.contains("INFO") || line.contains("WARN") {
            continue;
        }
        answer.push(line);
    }
    answer.join("\n").trim().to_string()
}

/// Drops terminal colour escapes (`ESC [ ... m`).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let task = passkey(args.tokens, args.depth, 2026);
    eprintln!(
        "Passkey task: ~{} tokens, key hidden at {:.0}% depth",
        args.tokens,
        args.depth * 100.0
    );
    let full = run_cli(&args, &task.prompt, true)?;
    let answer = full.lines().next().unwrap_or("");
    let freekv_ok = is_correct(answer, &task.key);
    println!(
        "\nhidden key: {}   FreeKV answer: {:?}   {}",
        task.key,
        answer.trim(),
        verdict(freekv_ok)
    );
    if args.compare_stock {
        let full = run_cli(&args, &task.prompt, false)?;
        let stock = full.lines().next().unwrap_or("");
        println!(
            "hidden key: {}   stock (dense) answer: {:?}   {}",
            task.key,
            stock.trim(),
            verdict(is_correct(stock, &task.key))
        );
    }
    if !freekv_ok {
        bail!("FreeKV's answer does not hold the key");
    }
    Ok(())
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "correct"
    } else {
        "WRONG"
    }
}
