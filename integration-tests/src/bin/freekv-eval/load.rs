//! Serving under load: 64 concurrent streaming chats of mixed prompt lengths, 10 abandoned
//! after three events, through `mistralrs serve` — FreeKV (budget 128) vs the stock eager path
//! of the same binary (`--paged-attn off`), and the same requests sent one at a time.

use std::sync::mpsc;
use std::time::Duration;

use anyhow::Result;
use freekv_integration_tests::load::{
    run_concurrent, run_sequential, LoadPlan, LoadReport, FREEKV_B128,
};
use freekv_integration_tests::server::Server;
use serde::{Deserialize, Serialize};

use crate::Ctx;

/// What to run.
pub struct Plan {
    pub load: LoadPlan,
    /// The stock eager run is stopped after this (it serves one sequence at a time).
    pub stock_cap: Duration,
    pub sequential_cap: Duration,
}

impl Plan {
    pub fn new(quick: bool) -> Self {
        if quick {
            Self {
                load: LoadPlan {
                    streams: 8,
                    cancel_every: 4,
                    max_tokens: 8,
                    min_words: 60,
                    span_words: 400,
                },
                stock_cap: Duration::from_secs(60),
                sequential_cap: Duration::from_secs(60),
            }
        } else {
            // Prompts of ~135-1,170 SmolLM2 tokens (filler units x ~0.62, chat template included).
            Self {
                load: LoadPlan {
                    streams: 64,
                    cancel_every: 7,
                    max_tokens: 24,
                    min_words: 200,
                    span_words: 1700,
                },
                stock_cap: Duration::from_secs(900),
                sequential_cap: Duration::from_secs(1800),
            }
        }
    }
}

/// One serving configuration under one way of sending.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Run {
    pub server: String,
    pub sending: String,
    pub streams: usize,
    /// Streams meant to complete (the others are abandoned by their client).
    pub expected: usize,
    pub completed: usize,
    pub cancelled: usize,
    pub failed: usize,
    pub wall_s: f64,
    pub requests_per_s: f64,
    pub latency_p50_s: f64,
    pub latency_p99_s: f64,
    pub first_token_p50_s: f64,
    /// Completion tokens per second of wall time, all streams together (prefill included).
    pub tokens_per_s: f64,
    /// Mean decode rate of one stream (tokens after the first / time after the first).
    pub stream_decode_tokens_per_s: f64,
    /// Pool and preemption figures from `/metrics` after the run (FreeKV only).
    pub preemptions: Option<f64>,
    pub idle_sequences: Option<f64>,
}

fn summarise(server: &str, sending: &str, plan: &LoadPlan, r: &LoadReport) -> Run {
    let mut firsts: Vec<f64> = r.completed.iter().map(|o| o.first_token_s).collect();
    firsts.sort_by(f64::total_cmp);
    Run {
        server: server.into(),
        sending: sending.into(),
        streams: plan.streams,
        expected: plan.uncancelled(),
        completed: r.completed.len(),
        cancelled: r.cancelled,
        failed: r.failed.len(),
        wall_s: r.wall_s,
        requests_per_s: r.requests_per_s(),
        latency_p50_s: r.latency_percentile(0.5),
        latency_p99_s: r.latency_percentile(0.99),
        first_token_p50_s: firsts.get(firsts.len() / 2).copied().unwrap_or(f64::NAN),
        tokens_per_s: r.tokens_per_s(),
        stream_decode_tokens_per_s: r.stream_decode_tokens_per_s(),
        preemptions: None,
        idle_sequences: None,
    }
}

/// Runs `send` against a fresh server; past `cap` the server is stopped, which fails the
/// streams still open (they count as not completed).
pub fn with_server(
    cx: &Ctx,
    name: &str,
    global: &[&str],
    serve: &[&str],
    cap: Duration,
    send: impl FnOnce(u16) -> LoadReport + Send + 'static,
) -> Result<(LoadReport, Option<std::collections::HashMap<String, f64>>)> {
    let server = Server::start(&cx.mistralrs, &cx.gguf, name, global, serve)?;
    let port = server.port;
    let (tx, rx) = mpsc::channel();
    let sender = std::thread::spawn(move || {
        let _ = tx.send(send(port));
    });
    let report = match rx.recv_timeout(cap) {
        Ok(report) => report,
        Err(_) => {
            eprintln!("{name}: past the {cap:?} cap, stopping the server");
            drop(server);
            let report = rx.recv()?;
            let _ = sender.join();
            return Ok((report, None));
        }
    };
    let _ = sender.join();
    std::thread::sleep(Duration::from_secs(2));
    let metrics = server.metrics().ok();
    Ok((report, metrics))
}

pub fn run(cx: &Ctx, plan: &Plan) -> Result<Vec<Run>> {
    let load = plan.load;
    let serve = ["--pa-context-len", "16384", "--max-seqs", "32"];
    let mut runs = Vec::new();

    let (r, m) = with_server(
        cx,
        "load-freekv",
        FREEKV_B128,
        &serve,
        plan.sequential_cap,
        move |p| run_concurrent(p, &load),
    )?;
    let mut run = summarise("FreeKV B=128", "concurrent", &load, &r);
    if let Some(m) = &m {
        run.preemptions = m.get("freekv_scheduler_preemptions_total").copied();
        run.idle_sequences = m.get("freekv_sequences").copied();
    }
    eprintln!("{run:?}");
    runs.push(run);

    let cap = plan.sequential_cap;
    let (r, _) = with_server(
        cx,
        "load-freekv-seq",
        FREEKV_B128,
        &serve,
        cap * 2,
        move |p| run_sequential(p, &load, cap),
    )?;
    let run = summarise("FreeKV B=128", "one at a time", &load, &r);
    eprintln!("{run:?}");
    runs.push(run);

    let stock = ["--paged-attn", "off", "--max-seqs", "32"];
    let (r, _) = with_server(cx, "load-stock", &[], &stock, plan.stock_cap, move |p| {
        run_concurrent(p, &load)
    })?;
    let run = summarise("stock eager", "concurrent", &load, &r);
    eprintln!("{run:?}");
    runs.push(run);
    Ok(runs)
}

pub fn table(runs: &[Run]) -> String {
    let mut md = String::from(
        "| server | sending | completed | cancelled | failed/unfinished | wall s | requests/s | \
         latency p50 s | p99 s | first token p50 s | completion tok/s (all) | decode tok/s (one stream) | preemptions |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in runs {
        md += &format!(
            "| {} | {} | {}/{} | {} | {} | {:.0} | {:.3} | {:.1} | {:.1} | {:.1} | {:.2} | {:.2} | {} |\n",
            r.server,
            r.sending,
            r.completed,
            r.expected,
            r.cancelled,
            r.failed,
            r.wall_s,
            r.requests_per_s,
            r.latency_p50_s,
            r.latency_p99_s,
            r.first_token_p50_s,
            r.tokens_per_s,
            r.stream_decode_tokens_per_s,
            r.preemptions.map_or("-".into(), |p| format!("{p:.0}")),
        );
    }
    md
}
