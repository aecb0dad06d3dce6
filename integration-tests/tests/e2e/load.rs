//! Serving under load: many concurrent streaming chats of mixed lengths through the real
//! server, FreeKV on a sparse budget, a block pool too small to hold them all at once (so the
//! scheduler must wait-list and preempt), some streams abandoned midway. Every other stream
//! completes within a bound, and afterwards FreeKV and the engine hold nothing.
//!
//! Then bad input: each malformed request gets a 4xx with a message, and the server keeps
//! serving.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use freekv_integration_tests::load::{run_concurrent, LoadPlan, FREEKV_B128};
use freekv_integration_tests::server::{answer, chat, Server};
use freekv_integration_tests::tiny_models::filler_text;
use freekv_integration_tests::{http, serial};
use serde_json::json;

/// 32 streams of ~35-130 prompt tokens (chat template included), 16 completion tokens,
/// every 5th abandoned.
const PLAN: LoadPlan = LoadPlan {
    streams: 32,
    cancel_every: 5,
    max_tokens: 16,
    min_words: 20,
    span_words: 260,
};
/// No request may take longer than this (the whole load takes ~2-3 minutes on 2 cores).
const REQUEST_BOUND_S: f64 = 420.0;

/// Polls `/metrics` until FreeKV holds no sequence and the pool is entirely free.
fn wait_idle(server: &Server) -> Result<std::collections::HashMap<String, f64>> {
    let start = Instant::now();
    loop {
        let m = server.metrics()?;
        let get = |k: &str| m.get(k).copied().unwrap_or(f64::NAN);
        let idle = get("freekv_sequences") == 0.0
            && get("freekv_scheduler_running") == 0.0
            && get("freekv_scheduler_waiting") == 0.0
            && get("freekv_kv_blocks_free") == get("freekv_kv_blocks");
        if idle {
            return Ok(m);
        }
        if start.elapsed() > Duration::from_secs(60) {
            bail!("not idle 60 s after the load: {m:?}");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn mixed_length_streams_under_memory_pressure() -> Result<()> {
    let _serial = serial();
    // 2048 tokens = 64 blocks of 32: the 32 requests need ~130 blocks at once.
    let mut server = Server::smollm2(
        "load",
        FREEKV_B128,
        &["--pa-context-len", "2048", "--max-seqs", "32"],
    )?;
    let report = run_concurrent(server.port, &PLAN);
    println!(
        "load: {} streams ({} completed, {} cancelled, {} failed) in {:.1} s: {:.2} requests/s, \
         latency p50 {:.1} s p99 {:.1} s, {:.1} completion tokens/s",
        PLAN.streams,
        report.completed.len(),
        report.cancelled,
        report.failed.len(),
        report.wall_s,
        report.requests_per_s(),
        report.latency_percentile(0.5),
        report.latency_percentile(0.99),
        report.tokens_per_s(),
    );
    assert!(
        report.failed.is_empty(),
        "streams failed: {:#?}",
        report.failed
    );
    assert_eq!(report.completed.len(), PLAN.uncancelled());
    for o in &report.completed {
        assert!(
            o.latency_s < REQUEST_BOUND_S,
            "stream {} took {:.0} s (bound {REQUEST_BOUND_S} s)",
            o.index,
            o.latency_s
        );
    }

    let m = wait_idle(&server)?;
    println!("idle after the load: {m:?}");
    assert!(
        m["freekv_sparse_steps_total"] > 0.0,
        "no sparse step: {m:?}"
    );
    assert_eq!(
        m.get("freekv_device_waits_total"),
        Some(&0.0),
        "the CPU backend has no device to wait for: {m:?}"
    );
    assert_eq!(
        m.get("freekv_unpinned_host_tiers"),
        Some(&0.0),
        "the CPU backend pins nothing and reports no unpinned tier: {m:?}"
    );
    assert!(server.alive(), "the server died");
    let after = answer(&http::post_json(
        server.port,
        "/v1/chat/completions",
        &chat(
            "What is the capital of France? Answer in one word.",
            8,
            false,
        ),
    )?)?;
    assert!(after.contains("Paris"), "answer after the load: {after:?}");
    Ok(())
}

/// A streamed raw-text completion (no chat template: SmolLM2 continues prose for long).
fn continuation(prompt: &str, max_tokens: usize) -> serde_json::Value {
    json!({
        "model": "default",
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": true,
    })
}

#[test]
fn preempted_sequences_finish_when_the_pool_is_short() -> Result<()> {
    let _serial = serial();
    // --pa-context-len 384 gives 10 usable blocks (320 tokens); each request grows from ~50 to
    // ~210 tokens = 7 blocks, so four of them cannot all stay resident: the youngest are
    // preempted and prefilled again (a prefix-cache hit), and every one still finishes.
    let mut server = Server::smollm2(
        "preemption",
        FREEKV_B128,
        &["--pa-context-len", "384", "--max-seqs", "4"],
    )?;
    let port = server.port;
    // One that can never fit is refused at once, naming the cache size.
    let start = Instant::now();
    let reply = http::post_json(
        port,
        "/v1/chat/completions",
        &chat(&filler_text(3, 1500), 4, false),
    )?;
    println!(
        "too long: {} {} ({:?})",
        reply.status,
        reply.body,
        start.elapsed()
    );
    assert!((400..500).contains(&reply.status), "{}", reply.body);
    assert!(reply.body.contains("KV cache size"), "{}", reply.body);
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "refused after {:?}",
        start.elapsed()
    );

    const TOKENS: usize = 160;
    let handles: Vec<_> = (0..4)
        .map(|i| {
            std::thread::spawn(move || {
                let prompt = filler_text(40 + i, 150);
                http::post_stream(
                    port,
                    "/v1/completions",
                    &continuation(&prompt, TOKENS),
                    None,
                )
            })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let events = h.join().expect("client thread panicked")?;
        let text: String = events
            .iter()
            .filter_map(|e| e["choices"][0]["text"].as_str())
            .collect();
        let reason = events
            .iter()
            .rev()
            .find_map(|e| e["choices"][0]["finish_reason"].as_str().map(String::from));
        println!(
            "request {i}: {} chars, finish reason {reason:?}",
            text.len()
        );
        assert!(
            matches!(reason.as_deref(), Some("length" | "stop")),
            "request {i} ended with {reason:?}"
        );
        assert!(!text.trim().is_empty(), "request {i}: empty text");
    }
    let m = wait_idle(&server)?;
    println!("idle: {m:?}");
    assert!(
        m["freekv_scheduler_preemptions_total"] > 0.0,
        "no sequence was preempted: the test did not exercise preemption ({m:?})"
    );
    assert!(server.alive(), "the server died");
    Ok(())
}

/// A request and the client error it must get.
struct BadRequest {
    what: &'static str,
    body: String,
}

#[test]
fn bad_requests_get_client_errors_and_the_server_keeps_serving() -> Result<()> {
    let _serial = serial();
    let mut server = Server::smollm2(
        "bad-requests",
        FREEKV_B128,
        &["--pa-context-len", "2048", "--max-seqs", "4"],
    )?;
    let port = server.port;
    let msg = |content: serde_json::Value, extra: serde_json::Value| {
        let mut body =
            json!({"model": "default", "messages": [{"role": "user", "content": content}]});
        for (k, v) in extra.as_object().into_iter().flatten() {
            body[k] = v.clone();
        }
        body.to_string()
    };
    let cases = [
        BadRequest {
            what: "malformed JSON",
            body: "{\"model\": \"default\", \"messages\": [".into(),
        },
        BadRequest {
            what: "messages of the wrong type",
            body: json!({"model": "default", "messages": 42}).to_string(),
        },
        BadRequest {
            what: "max_tokens of the wrong type",
            body: msg(json!("hi"), json!({"max_tokens": "ten"})),
        },
        BadRequest {
            what: "negative max_tokens",
            body: msg(json!("hi"), json!({"max_tokens": -5})),
        },
        BadRequest {
            what: "huge max_tokens",
            body: msg(json!("hi"), json!({"max_tokens": 1u64 << 40})),
        },
        BadRequest {
            what: "empty messages",
            body: json!({"model": "default", "messages": []}).to_string(),
        },
        BadRequest {
            what: "a prompt longer than the context",
            body: msg(json!(filler_text(7, 9000)), json!({"max_tokens": 4})),
        },
    ];
    let mut failures = Vec::new();
    for case in &cases {
        let reply = http::post_raw(port, "/v1/chat/completions", &case.body)?;
        println!("{}: {} {}", case.what, reply.status, reply.body);
        if !(400..500).contains(&reply.status) || reply.body.trim().is_empty() {
            failures.push(format!("{}: {} {:?}", case.what, reply.status, reply.body));
        }
        assert!(server.alive(), "the server died on {}", case.what);
    }
    let after = answer(&http::post_json(
        port,
        "/v1/chat/completions",
        &chat(
            "What is the capital of France? Answer in one word.",
            8,
            false,
        ),
    )?)?;
    assert!(after.contains("Paris"), "answer after bad input: {after:?}");
    assert!(
        failures.is_empty(),
        "not answered with a 4xx: {failures:#?}"
    );
    Ok(())
}
