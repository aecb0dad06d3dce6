//! `mistralrs serve` with FreeKV and the real model: concurrent OpenAI chat completions,
//! streaming and not, one stream cancelled midway; every other answer completes and the
//! server keeps serving.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use freekv_integration_tests::{http, paths, serial};
use serde_json::{json, Value};

/// Kills the server when the test ends, however it ends.
struct Server {
    child: Child,
    port: u16,
    log: std::path::PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn start_server() -> Result<Server> {
    let gguf = paths::smollm2_gguf()?;
    let port = free_port()?;
    let log = paths::scratch("server")?.join("server.log");
    let child = Command::new(paths::mistralrs_bin()?)
        .args(["--token-source", "none"])
        .args([
            "--freekv-budget",
            "256",
            "--freekv-sink",
            "64",
            "--freekv-window",
            "64",
        ])
        .args(["serve", "--format", "gguf", "-m"])
        .arg(gguf.parent().context("gguf folder")?)
        .arg("-f")
        .arg(gguf.file_name().context("gguf name")?)
        .args(["--cpu", "--pa-context-len", "8192", "--max-seqs", "8"])
        .args(["--host", "127.0.0.1", "-p", &port.to_string()])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log)?)
        .stderr(std::fs::File::create(log.with_extension("err"))?)
        .spawn()
        .context("start mistralrs serve")?;
    let mut server = Server { child, port, log };
    let start = Instant::now();
    loop {
        if let Ok(r) = http::get(port, "/health") {
            if r.status == 200 {
                return Ok(server);
            }
        }
        if let Some(status) = server.child.try_wait()? {
            bail!(
                "server exited ({status}) before it was healthy; see {}",
                server.log.display()
            );
        }
        if start.elapsed() > Duration::from_secs(300) {
            bail!(
                "server not healthy after 5 minutes; see {}",
                server.log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn chat(content: &str, max_tokens: usize, stream: bool) -> Value {
    json!({
        "model": "default",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": stream,
    })
}

/// The text of a non-streamed completion, checked for a proper end.
fn answer(reply: &http::Reply) -> Result<String> {
    if reply.status != 200 {
        bail!("status {}: {}", reply.status, reply.body);
    }
    let v: Value = serde_json::from_str(&reply.body)?;
    let choice = &v["choices"][0];
    let reason = choice["finish_reason"].as_str().unwrap_or("");
    if reason != "stop" && reason != "length" {
        bail!("finish_reason {reason:?}: {}", reply.body);
    }
    Ok(choice["message"]["content"]
        .as_str()
        .unwrap_or("")
        .to_string())
}

/// The text of a full stream, checked for a proper end.
fn streamed_answer(events: &[Value]) -> Result<String> {
    let mut text = String::new();
    let mut reason = String::new();
    for e in events {
        if let Some(t) = e["choices"][0]["delta"]["content"].as_str() {
            text.push_str(t);
        }
        if let Some(r) = e["choices"][0]["finish_reason"].as_str() {
            reason = r.to_string();
        }
    }
    if reason != "stop" && reason != "length" {
        bail!("stream ended with finish_reason {reason:?}");
    }
    Ok(text)
}

#[test]
fn concurrent_chats_with_a_cancelled_stream() -> Result<()> {
    let _serial = serial();
    let server = start_server()?;
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
