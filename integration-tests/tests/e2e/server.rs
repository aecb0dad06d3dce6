//! `mistralrs serve` with FreeKV and the real model: concurrent OpenAI chat completions,
//! streaming and not, one stream cancelled midway; every other answer completes and the
//! server keeps serving.

use anyhow::{Context, Result};
use freekv_integration_tests::server::{answer, chat, streamed_answer, Server};
use freekv_integration_tests::{http, serial};

#[test]
fn concurrent_chats_with_a_cancelled_stream() -> Result<()> {
    let _serial = serial();
    let server = Server::smollm2(
        "server",
        &[
            "--freekv-budget",
            "256",
            "--freekv-sink",
            "64",
            "--freekv-window",
            "64",
        ],
        &["--pa-context-len", "8192", "--max-seqs", "8"],
    )?;
    let port = server.port;
    let questions = [
        "What is the capital of France?",
        "Name three primary colors.",
        "Write one sentence about the sea.",
        "What is 12 plus 30?",
        "Give a synonym for happy.",
        "What do bees make?",
        "Describe a cat in five words.",
        "Name a large animal.",
    ];
    let handles: Vec<_> = questions
        .iter()
        .enumerate()
        .map(|(i, q)| {
            let q = q.to_string();
            std::thread::spawn(move || -> Result<Option<String>> {
                match i {
                    // Cancelled: read three events, then hang up.
                    0 => {
                        http::post_stream(
                            port,
                            "/v1/chat/completions",
                            &chat(&q, 200, true),
                            Some(3),
                        )?;
                        Ok(None)
                    }
                    i if i % 2 == 1 => {
                        let events = http::post_stream(
                            port,
                            "/v1/chat/completions",
                            &chat(&q, 48, true),
                            None,
                        )?;
                        Ok(Some(streamed_answer(&events)?))
                    }
                    _ => Ok(Some(answer(&http::post_json(
                        port,
                        "/v1/chat/completions",
                        &chat(&q, 48, false),
                    )?)?)),
                }
            })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let result = h.join().expect("client thread panicked");
        let text = result.with_context(|| format!("request {i} ({:?})", questions[i]))?;
        if let Some(text) = text {
            println!("{:40} -> {:?}", questions[i], text);
            assert!(!text.trim().is_empty(), "request {i} got an empty answer");
        }
    }
    // Still serving, and the model still answers sensibly.
    let after = answer(&http::post_json(
        port,
        "/v1/chat/completions",
        &chat(
            "What is the capital of France? Answer in one word.",
            16,
            false,
        ),
    )?)?;
    println!("after the cancellation -> {after:?}");
    assert!(
        after.contains("Paris"),
        "unexpected answer after the cancellation: {after:?}"
    );
    let log = std::fs::read_to_string(&server.log).unwrap_or_default();
    assert!(
        log.contains("FreeKV"),
        "the server log shows no FreeKV activity; see {}",
        server.log.display()
    );
    Ok(())
}
