//! Where the tests find the engine's CLI binary and the real model.
//!
//! `cargo xtask test` sets `FREEKV_MISTRALRS_BIN` and `FREEKV_SMOLLM2_GGUF`; without them the
//! defaults are the workspace's release build and `cargo xtask fetch-model`'s cache. A missing
//! file is an error that says how to get it, never a silent skip.

use std::path::PathBuf;

use anyhow::{ensure, Result};

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("integration-tests sits in the workspace")
        .to_path_buf()
}

/// The `mistralrs` CLI built with `--features freekv`.
pub fn mistralrs_bin() -> Result<PathBuf> {
    let path = std::env::var_os("FREEKV_MISTRALRS_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/release/mistralrs"));
    ensure!(
        path.is_file(),
        "{} is missing: build it with `cargo xtask test` (or `cargo build --release --workspace \
         --features mistralrs-cli/freekv`)",
        path.display()
    );
    Ok(path)
}

/// SmolLM2-135M-Instruct, GGUF Q4_1.
pub fn smollm2_gguf() -> Result<PathBuf> {
    let path = std::env::var_os("FREEKV_SMOLLM2_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            workspace_root().join(".cache/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    ensure!(
        path.is_file(),
        "{} is missing: fetch it with `cargo xtask fetch-model`",
        path.display()
    );
    Ok(path)
}

/// A fresh scratch folder under the target directory, removed first if it exists.
pub fn scratch(name: &str) -> Result<PathBuf> {
    let dir = workspace_root().join("target/freekv-scratch").join(name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
