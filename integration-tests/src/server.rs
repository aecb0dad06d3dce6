//! The engine's OpenAI-compatible server (`mistralrs serve`) as a child process on a free
//! loopback port, and the checks every server test makes of its answers.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::{http, paths};

/// A running server; killed when dropped, however the test ends.
pub struct Server {
    child: Child,
    pub port: u16,
    /// The server's standard output (the engine's log).
    pub log: std::path::PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port free on the loopback interface now.
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Server {
    /// Serves the real model (SmolLM2 GGUF) on the CPU: `global` flags go before `serve`
    /// (the `--freekv-*` knobs), `serve_args` after it (e.g. `--pa-context-len`). Waits until
    /// `/health` answers (5 minutes at most).
    pub fn smollm2(name: &str, global: &[&str], serve_args: &[&str]) -> Result<Server> {
        Self::start(
            &paths::mistralrs_bin()?,
            &paths::smollm2_gguf()?,
            name,
            global,
            serve_args,
        )
    }

    /// [`Server::smollm2`] with the engine binary and the GGUF file given.
    pub fn start(
        bin: &std::path::Path,
        gguf: &std::path::Path,
        name: &str,
        global: &[&str],
        serve_args: &[&str],
    ) -> Result<Server> {
        let mut cmd = Command::new(bin);
        cmd.args(["--token-source", "none"])
            .args(global)
            .args(["serve", "--format", "gguf", "-m"])
            .arg(gguf.parent().context("gguf folder")?)
            .arg("-f")
            .arg(gguf.file_name().context("gguf name")?)
            .arg("--cpu")
            .args(serve_args);
        Self::spawn(cmd, &paths::scratch(name)?)
    }

    /// Starts `cmd` (a `mistralrs ... serve ...` command: the loopback host and a free port are
    /// added, the log goes to `dir/server.log` and `.err`) and waits until `/health` answers
    /// (5 minutes at most).
    pub fn spawn(mut cmd: Command, dir: &std::path::Path) -> Result<Server> {
        let port = free_port()?;
        let log = dir.join("server.log");
        let child = cmd
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

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The samples of `/metrics` (Prometheus text), by metric name (labels dropped).
    pub fn metrics(&self) -> Result<std::collections::HashMap<String, f64>> {
        let reply = http::get(self.port, "/metrics")?;
        if reply.status != 200 {
            bail!("/metrics answered {}: {}", reply.status, reply.body);
        }
        Ok(reply
            .body
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (name, value) = l.rsplit_once(' ')?;
                let name = name.split('{').next()?;
                Some((name.to_string(), value.parse().ok()?))
            })
            .collect())
    }
}

/// A greedy chat request.
pub fn chat(content: &str, max_tokens: usize, stream: bool) -> Value {
    json!({
        "model": "default",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": stream,
    })
}

/// The text of a non-streamed completion, checked for a proper end.
pub fn answer(reply: &http::Reply) -> Result<String> {
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
pub fn streamed_answer(events: &[Value]) -> Result<String> {
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
