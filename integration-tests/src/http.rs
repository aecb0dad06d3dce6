//! A minimal HTTP/1.1 client over `std::net`, enough to drive the OpenAI-compatible server:
//! GET, POST JSON, and Server-Sent-Event streams that can be abandoned midway (the way a
//! client cancels a request).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// A full response.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: String,
}

/// How long a read may wait for the server before the request counts as hung.
pub const PATIENCE: Duration = Duration::from_secs(600);

fn connect(port: u16, patience: Duration) -> Result<TcpStream> {
    let stream = TcpStream::connect(("127.0.0.1", port)).context("connect")?;
    stream.set_read_timeout(Some(patience))?;
    Ok(stream)
}

fn send(stream: &mut TcpStream, method: &str, path: &str, body: Option<&str>) -> Result<()> {
    let body = body.unwrap_or("");
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()?;
    Ok(())
}

/// Reads the status line and headers; returns the status and whether the body is chunked.
fn read_head(reader: &mut impl BufRead) -> Result<(u16, bool, Option<usize>)> {
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line {line:?}"))?;
    let (mut chunked, mut length) = (false, None);
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
        let lower = line.to_ascii_lowercase();
        if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
            chunked = true;
        }
        if let Some(v) = lower.strip_prefix("content-length:") {
            length = v.trim().parse().ok();
        }
    }
    Ok((status, chunked, length))
}

/// The body's bytes, undoing chunked transfer encoding.
fn read_body(reader: &mut impl BufRead, chunked: bool, length: Option<usize>) -> Result<Vec<u8>> {
    let mut body = Vec::new();
    if !chunked {
        match length {
            Some(n) => {
                body.resize(n, 0);
                reader.read_exact(&mut body)?;
            }
            None => {
                reader.read_to_end(&mut body)?;
            }
        }
        return Ok(body);
    }
    loop {
        let mut size = String::new();
        reader.read_line(&mut size)?;
        let n = usize::from_str_radix(size.trim(), 16)
            .with_context(|| format!("bad chunk size {size:?}"))?;
        if n == 0 {
            return Ok(body);
        }
        let start = body.len();
        body.resize(start + n, 0);
        reader.read_exact(&mut body[start..])?;
        let mut crlf = [0u8; 2];
        reader.read_exact(&mut crlf)?;
    }
}

/// `GET path`.
pub fn get(port: u16, path: &str) -> Result<Reply> {
    request(port, "GET", path, None)
}

/// `POST path` with a JSON body.
pub fn post_json(port: u16, path: &str, body: &serde_json::Value) -> Result<Reply> {
    request(port, "POST", path, Some(&body.to_string()))
}

/// `POST path` with a body sent as it is (for malformed requests).
pub fn post_raw(port: u16, path: &str, body: &str) -> Result<Reply> {
    request(port, "POST", path, Some(body))
}

fn request(port: u16, method: &str, path: &str, body: Option<&str>) -> Result<Reply> {
    let mut stream = connect(port, PATIENCE)?;
    send(&mut stream, method, path, body)?;
    let mut reader = BufReader::new(stream);
    let (status, chunked, length) = read_head(&mut reader)?;
    let body = read_body(&mut reader, chunked, length)?;
    Ok(Reply {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// A streamed (SSE) POST: returns the JSON of each `data:` event until `[DONE]`, or only the
/// first `stop_after` events, after which the connection is dropped (a cancelled request).
pub fn post_stream(
    port: u16,
    path: &str,
    body: &serde_json::Value,
    stop_after: Option<usize>,
) -> Result<Vec<serde_json::Value>> {
    post_stream_timed(port, path, body, stop_after, PATIENCE, &mut |_| {})
}

/// [`post_stream`], calling `on_event` as each event arrives (e.g. to time the first token),
/// waiting up to `patience` for each read (a long prompt's first token comes late).
pub fn post_stream_timed(
    port: u16,
    path: &str,
    body: &serde_json::Value,
    stop_after: Option<usize>,
    patience: Duration,
    on_event: &mut dyn FnMut(&serde_json::Value),
) -> Result<Vec<serde_json::Value>> {
    let mut stream = connect(port, patience)?;
    send(&mut stream, "POST", path, Some(&body.to_string()))?;
    let mut reader = BufReader::new(stream);
    let (status, chunked, _) = read_head(&mut reader)?;
    if status != 200 {
        let body = read_body(&mut reader, chunked, None)?;
        bail!("status {status}: {}", String::from_utf8_lossy(&body));
    }
    let mut reader: Box<dyn BufRead> = if chunked {
        Box::new(BufReader::new(Dechunk {
            inner: reader,
            left: 0,
            done: false,
        }))
    } else {
        Box::new(reader)
    };
    let mut events: Vec<serde_json::Value> = Vec::new();
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            bail!(
                "stream ended without [DONE] after {} events; the last: {}",
                events.len(),
                events.last().map_or("none".into(), |e| e.to_string())
            );
        }
        // Blank lines and comments carry no event.
        let Some(data) = line.trim().strip_prefix("data:") else {
            continue;
        };
        let data = data.trim();
        if data == "[DONE]" {
            return Ok(events);
        }
        let event = serde_json::from_str(data).with_context(|| format!("bad event {data:?}"))?;
        on_event(&event);
        events.push(event);
        if stop_after.is_some_and(|n| events.len() >= n) {
            // Dropping the reader closes the socket: the server sees the client go away.
            return Ok(events);
        }
    }
}

/// Undoes chunked transfer encoding as a byte stream, so events split across chunks survive.
struct Dechunk<R> {
    inner: R,
    left: usize,
    done: bool,
}

impl<R: BufRead> Read for Dechunk<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.done {
            return Ok(0);
        }
        if self.left == 0 {
            let mut size = String::new();
            self.inner.read_line(&mut size)?;
            if size.trim().is_empty() {
                // The CRLF that ends the previous chunk.
                size.clear();
                self.inner.read_line(&mut size)?;
            }
            let n = usize::from_str_radix(size.trim(), 16).map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("chunk size {size:?}"),
                )
            })?;
            if n == 0 {
                self.done = true;
                return Ok(0);
            }
            self.left = n;
        }
        let want = buf.len().min(self.left);
        let got = self.inner.read(&mut buf[..want])?;
        self.left -= got;
        Ok(got)
    }
}
