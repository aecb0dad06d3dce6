//! Does batching pay? Decode throughput of many concurrent streams vs one stream, through
//! `mistralrs serve` with FreeKV (budget 128): the same short-prompt, long-answer requests
//! sent all at once, then one at a time. Prompts of ~100-120 tokens, so that decoding
//! crosses into FreeKV's sparse path (from 128 tokens) and prompt work stays small.

use std::time::Duration;

use anyhow::Result;
use freekv_integration_tests::load::{run_concurrent, run_sequential, LoadPlan, FREEKV_B128};
use serde::{Deserialize, Serialize};

use crate::load::with_server;
use crate::Ctx;

/// What to run.
pub struct Plan {
    pub concurrent: LoadPlan,
    /// The same requests one at a time: this many of them.
    pub single_streams: usize,
}

impl Plan {
    pub fn new(quick: bool) -> Self {
        let concurrent = LoadPlan {
            streams: if quick { 4 } else { 32 },
            cancel_every: 0,
            max_tokens: if quick { 16 } else { 96 },
            min_words: 150,
            span_words: 40,
        };
        Self {
            concurrent,
            single_streams: if quick { 1 } else { 4 },
        }
    }
}

/// One way of sending the plan's requests.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Run {
    pub sending: String,
    pub streams: usize,
    pub completed: usize,
    pub wall_s: f64,
    pub completion_tokens: usize,
    /// Decode tokens per second of all streams together while all of them decode (see
    /// `LoadReport::aggregate_decode_tokens_per_s`; one at a time: the mean of one stream).
    pub decode_tokens_per_s: f64,
    /// Mean decode rate of one stream.
    pub stream_decode_tokens_per_s: f64,
    pub first_token_p50_s: f64,
}

pub fn run(cx: &Ctx, plan: &Plan) -> Result<Vec<Run>> {
    let serve = ["--pa-context-len", "16384", "--max-seqs", "32"];
    let concurrent = plan.concurrent;
    let cap = Duration::from_secs(1800);
    let (all, _) = with_server(cx, "batching-all", FREEKV_B128, &serve, cap, move |p| {
        run_concurrent(p, &concurrent)
    })?;
    let single = LoadPlan {
        streams: plan.single_streams,
        ..concurrent
    };
    let (one, _) = with_server(cx, "batching-one", FREEKV_B128, &serve, cap, move |p| {
        run_sequential(p, &single, cap)
    })?;
    let summarise = |sending: &str,
                     streams: usize,
                     r: &freekv_integration_tests::load::LoadReport,
                     aggregate: f64| {
        let mut firsts: Vec<f64> = r.completed.iter().map(|o| o.first_token_s).collect();
        firsts.sort_by(f64::total_cmp);
        Run {
            sending: sending.into(),
            streams,
            completed: r.completed.len(),
            wall_s: r.wall_s,
            completion_tokens: r.completed.iter().map(|o| o.completion_tokens).sum(),
            decode_tokens_per_s: aggregate,
            stream_decode_tokens_per_s: r.stream_decode_tokens_per_s(),
            first_token_p50_s: firsts.get(firsts.len() / 2).copied().unwrap_or(f64::NAN),
        }
    };
    let runs = vec![
        summarise(
            "all at once",
            concurrent.streams,
            &all,
            all.aggregate_decode_tokens_per_s(),
        ),
        summarise(
            "one at a time",
            single.streams,
            &one,
            one.stream_decode_tokens_per_s(),
        ),
    ];
    for r in &runs {
        eprintln!("{r:?}");
    }
    Ok(runs)
}

/// The table, with the ratio of the concurrent decode rate to one stream's.
pub fn table(runs: &[Run]) -> String {
    let mut md = String::from(
        "| sending | streams | completed | wall s | completion tokens | decode tok/s (all streams) | \
         decode tok/s (one stream) | first token p50 s |\n|---|---|---|---|---|---|---|---|\n",
    );
    for r in runs {
        md += &format!(
            "| {} | {} | {} | {:.0} | {} | {:.1} | {:.1} | {:.1} |\n",
            r.sending,
            r.streams,
            r.completed,
            r.wall_s,
            r.completion_tokens,
            r.decode_tokens_per_s,
            r.stream_decode_tokens_per_s,
            r.first_token_p50_s
        );
    }
    if let [all, one, ..] = runs {
        md += &format!(
            "\nDecode throughput with {} streams at once: {:.1}x one stream's.\n",
            all.streams,
            all.decode_tokens_per_s / one.decode_tokens_per_s
        );
    }
    md
}
