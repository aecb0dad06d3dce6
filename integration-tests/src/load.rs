//! A load of concurrent streaming chat requests against a running server, the way many
//! clients would send it: mixed prompt lengths, some clients hanging up midway. Used by the
//! CI load test and by the evaluation's `load` part.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde::Serialize;

use crate::http;
use crate::server::{chat, streamed_answer};
use crate::tiny_models::filler_text;

/// The FreeKV knobs of the load runs: budget 128 = 32 sink + 32 window + 2 pages of 32
/// (sparse from 128 tokens on).
pub const FREEKV_B128: &[&str] = &[
    "--freekv-budget",
    "128",
    "--freekv-sink",
    "32",
    "--freekv-window",
    "32",
];

/// What to send.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct LoadPlan {
    pub streams: usize,
    /// Stream `i` hangs up after three events when `i % cancel_every == 0` (0: none does).
    pub cancel_every: usize,
    /// Completion tokens of an uncancelled stream.
    pub max_tokens: usize,
    /// Prompt `i` holds a note of `min_words + (i * 37) % span_words` units of filler text
    /// (`filler_text`'s test-tokenizer tokens; ~0.62 SmolLM2 tokens each).
    pub min_words: usize,
    pub span_words: usize,
}

impl LoadPlan {
    pub fn cancelled(&self, i: usize) -> bool {
        self.cancel_every > 0 && i.is_multiple_of(self.cancel_every)
    }

    pub fn uncancelled(&self) -> usize {
        (0..self.streams).filter(|&i| !self.cancelled(i)).count()
    }

    /// The prompt of stream `i`: a question after a note of mixed length.
    pub fn prompt(&self, i: usize) -> String {
        let words = self.min_words + (i * 37) % self.span_words.max(1);
        format!(
            "Read the note, then answer briefly.\n\nNote: {}\n\nQuestion: what is the note about?",
            filler_text(i as u64, words)
        )
    }
}

/// One completed stream.
#[derive(Clone, Debug, Serialize)]
pub struct StreamOutcome {
    pub index: usize,
    /// From sending the request to `[DONE]`.
    pub latency_s: f64,
    /// From sending the request to the first content event.
    pub first_token_s: f64,
    /// Completion tokens the server reported (its usage), else content events.
    pub completion_tokens: usize,
    /// When each content event arrived, seconds from sending the request.
    pub event_times_s: Vec<f64>,
    pub text: String,
}

/// Percentile `p` in [0, 1] of sorted values (nearest rank; NaN when empty).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[(((sorted.len() - 1) as f64) * p).round() as usize]
}

/// What a load did.
#[derive(Clone, Debug, Serialize)]
pub struct LoadReport {
    pub wall_s: f64,
    pub completed: Vec<StreamOutcome>,
    /// Errors of streams that should have completed (index, message).
    pub failed: Vec<(usize, String)>,
    pub cancelled: usize,
}

impl LoadReport {
    /// Latency percentile `p` in [0, 1] over completed streams, seconds.
    pub fn latency_percentile(&self, p: f64) -> f64 {
        let mut l: Vec<f64> = self.completed.iter().map(|o| o.latency_s).collect();
        l.sort_by(f64::total_cmp);
        percentile(&l, p)
    }

    /// Completion tokens per second of wall time, all streams together (prefill included).
    pub fn tokens_per_s(&self) -> f64 {
        let n: usize = self.completed.iter().map(|o| o.completion_tokens).sum();
        n as f64 / self.wall_s
    }

    /// Decode tokens per second of all streams together while every one of them is decoding:
    /// content events of all streams between the last stream's first token and the first
    /// stream's last one, over that window (streams that start together; NaN without such a
    /// window).
    pub fn aggregate_decode_tokens_per_s(&self) -> f64 {
        let all = |f: fn(&StreamOutcome) -> f64| self.completed.iter().map(f);
        let from = all(|o| o.first_token_s).fold(f64::NEG_INFINITY, f64::max);
        let to =
            all(|o| o.event_times_s.last().copied().unwrap_or(0.0)).fold(f64::INFINITY, f64::min);
        if self.completed.is_empty() || to <= from {
            return f64::NAN;
        }
        let events = self
            .completed
            .iter()
            .flat_map(|o| &o.event_times_s)
            .filter(|&&t| t > from && t <= to)
            .count();
        events as f64 / (to - from)
    }

    /// Mean decode rate of one stream: tokens after the first over the time after the first.
    pub fn stream_decode_tokens_per_s(&self) -> f64 {
        let rates: Vec<f64> = self
            .completed
            .iter()
            .filter(|o| o.completion_tokens > 1 && o.latency_s > o.first_token_s)
            .map(|o| (o.completion_tokens - 1) as f64 / (o.latency_s - o.first_token_s))
            .collect();
        rates.iter().sum::<f64>() / rates.len().max(1) as f64
    }

    pub fn requests_per_s(&self) -> f64 {
        self.completed.len() as f64 / self.wall_s
    }
}

/// Sends stream `i` and waits for its end (or hangs up, if it is a cancelled one).
pub fn send_stream(port: u16, plan: &LoadPlan, i: usize) -> Result<Option<StreamOutcome>> {
    let cancel = plan.cancelled(i);
    let max_tokens = if cancel { 200 } else { plan.max_tokens };
    let start = Instant::now();
    let mut times = Vec::new();
    let events = http::post_stream_timed(
        port,
        "/v1/chat/completions",
        &chat(&plan.prompt(i), max_tokens, true),
        cancel.then_some(3),
        http::PATIENCE,
        &mut |e| {
            if e["choices"][0]["delta"]["content"].is_string() {
                times.push(start.elapsed().as_secs_f64());
            }
        },
    )?;
    if cancel {
        return Ok(None);
    }
    let latency = start.elapsed();
    let text = streamed_answer(&events)?;
    if text.trim().is_empty() {
        bail!("empty answer");
    }
    let reported = events
        .iter()
        .rev()
        .find_map(|e| e["usage"]["completion_tokens"].as_u64());
    let content_events = events
        .iter()
        .filter(|e| e["choices"][0]["delta"]["content"].is_string())
        .count();
    Ok(Some(StreamOutcome {
        index: i,
        latency_s: latency.as_secs_f64(),
        first_token_s: times.first().copied().unwrap_or(latency.as_secs_f64()),
        completion_tokens: reported.map_or(content_events, |n| n as usize),
        event_times_s: times,
        text,
    }))
}

/// Every stream of `plan` at once, one client thread each.
pub fn run_concurrent(port: u16, plan: &LoadPlan) -> LoadReport {
    let start = Instant::now();
    let plan = *plan;
    let handles: Vec<_> = (0..plan.streams)
        .map(|i| std::thread::spawn(move || send_stream(port, &plan, i)))
        .collect();
    let mut report = LoadReport {
        wall_s: 0.0,
        completed: Vec::new(),
        failed: Vec::new(),
        cancelled: 0,
    };
    for (i, h) in handles.into_iter().enumerate() {
        match h.join() {
            Ok(Ok(Some(o))) => report.completed.push(o),
            Ok(Ok(None)) => report.cancelled += 1,
            Ok(Err(e)) => report.failed.push((i, format!("{e:#}"))),
            Err(_) => report.failed.push((i, "client thread panicked".into())),
        }
    }
    report.wall_s = start.elapsed().as_secs_f64();
    report
}

/// The uncancelled streams of `plan`, one at a time; stops starting new ones after `cap`.
pub fn run_sequential(port: u16, plan: &LoadPlan, cap: Duration) -> LoadReport {
    let start = Instant::now();
    let mut report = LoadReport {
        wall_s: 0.0,
        completed: Vec::new(),
        failed: Vec::new(),
        cancelled: 0,
    };
    for i in (0..plan.streams).filter(|&i| !plan.cancelled(i)) {
        if start.elapsed() > cap {
            report
                .failed
                .push((i, format!("not sent: past the {cap:?} cap")));
            continue;
        }
        match send_stream(port, plan, i) {
            Ok(Some(o)) => report.completed.push(o),
            Ok(None) => report.cancelled += 1,
            Err(e) => report.failed.push((i, format!("{e:#}"))),
        }
    }
    report.wall_s = start.elapsed().as_secs_f64();
    report
}
