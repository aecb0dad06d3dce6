//! The engine's tensor parallelism on the CPU: each rank a `mistralrs serve` process on the
//! loopback interface, joined by the engine's ring backend (`RING_CONFIG`). Rank 0 (the
//! master) serves HTTP; the others replay its steps and log what their FreeKV did.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result};
use serde_json::json;

use crate::server::{free_port, Server};
use crate::{paths, tiny_models};

/// `mistralrs --token-source none GLOBAL serve -m MODEL --cpu SERVE` for a tiny model, each
/// process on one compute thread (the ranks share this machine's cores).
pub fn tiny_serve(model: &Path, global: &[&str], serve: &[&str]) -> Result<Command> {
    let mut cmd = Command::new(paths::mistralrs_bin()?);
    cmd.env("RAYON_NUM_THREADS", "1")
        .args(["--token-source", "none"])
        .args(global)
        .args(["serve", "-m"])
        .arg(model)
        .args(["--cpu"])
        .args(serve);
    Ok(cmd)
}

/// A non-master rank: killed when dropped.
pub struct Daemon {
    child: Child,
    /// Its log (standard output and error).
    pub log: PathBuf,
}

impl Daemon {
    /// Its log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Kills the rank (as a crash would).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A tensor-parallel world of `mistralrs serve` processes.
pub struct RingWorld {
    /// Rank 0, serving HTTP.
    pub master: Server,
    /// Ranks 1.., in order.
    pub daemons: Vec<Daemon>,
}

/// One rank's ring configuration: it listens on `ports[rank]` (loopback only) and connects to
/// the next rank's port; the master takes the daemons' connections on `master_port`.
fn ring_config(rank: usize, ports: &[u16], master_port: u16) -> serde_json::Value {
    json!({
        "master_ip": "127.0.0.1",
        "master_port": master_port,
        "port": ports[rank],
        "right_ip": "127.0.0.1",
        "right_port": ports[(rank + 1) % ports.len()],
        "rank": rank,
        "world_size": ports.len(),
        "bind_ip": "127.0.0.1",
        "connect_timeout_secs": 60,
    })
}

impl RingWorld {
    /// Starts `world_size` ranks of `command()` (each call a fresh `mistralrs ... serve`
    /// command, see [`tiny_serve`]) and waits until the master answers `/health`.
    pub fn start(
        name: &str,
        world_size: usize,
        command: impl Fn() -> Result<Command>,
    ) -> Result<RingWorld> {
        let dir = paths::scratch(name)?;
        let ports: Vec<u16> = (0..world_size)
            .map(|_| free_port())
            .collect::<Result<_>>()?;
        let master_port = free_port()?;
        let mut configs = Vec::new();
        for rank in 0..world_size {
            let path = dir.join(format!("ring-{rank}.json"));
            std::fs::write(&path, ring_config(rank, &ports, master_port).to_string())?;
            configs.push(path);
        }
        // The daemons first: each waits for its neighbours and the master.
        let mut daemons = Vec::new();
        for (rank, config) in configs.iter().enumerate().skip(1) {
            let log = dir.join(format!("rank-{rank}.log"));
            let out = std::fs::File::create(&log)?;
            // A daemon never serves HTTP; the engine's CLI still wants a port.
            let child = command()?
                .env("RING_CONFIG", config)
                .args(["--host", "127.0.0.1", "-p", &free_port()?.to_string()])
                .stdin(Stdio::null())
                .stdout(out.try_clone()?)
                .stderr(out)
                .spawn()
                .with_context(|| format!("start rank {rank}"))?;
            daemons.push(Daemon { child, log });
        }
        let mut master = command()?;
        master.env("RING_CONFIG", &configs[0]);
        let master = Server::spawn(master, &dir)
            .with_context(|| format!("rank 0; the other ranks' logs are in {}", dir.display()))?;
        Ok(RingWorld { master, daemons })
    }
}

/// The tiny models whose query and KV heads both split over `world_size` ranks.
pub fn splitting_archs(world_size: usize) -> Vec<tiny_models::Arch> {
    tiny_models::Arch::ALL
        .into_iter()
        .filter(|a| {
            let (heads, kv_heads, _) = a.shape();
            heads % world_size == 0 && kv_heads % world_size == 0
        })
        .collect()
}

/// Whether the engine shards the architecture's attention over the ranks. mistral.rs 0.8.1
/// replicates Phi-3's layers on every rank (no tensor-parallel layers): each rank then holds
/// every KV head, and FreeKV's host tier on a rank is one rank's whole.
pub fn engine_shards_attention(arch: tiny_models::Arch) -> bool {
    !matches!(arch, tiny_models::Arch::Phi3)
}

/// FreeKV's release lines in a log (`FreeKV model #M (rank R of W) request N released: ...`),
/// as (request id, the counters' `key=value` pairs).
pub fn released(log: &str) -> Vec<(u64, std::collections::HashMap<String, f64>)> {
    log.lines()
        .filter_map(|line| {
            let (_, rest) = line.split_once(" request ")?;
            let (id, counters) = rest.split_once(" released: ")?;
            let counters = counters
                .split_whitespace()
                .filter_map(|kv| {
                    let (k, v) = kv.split_once('=')?;
                    Some((k.to_string(), v.parse().ok()?))
                })
                .collect();
            Some((id.trim().parse().ok()?, counters))
        })
        .collect()
}
