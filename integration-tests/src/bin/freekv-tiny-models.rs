//! `freekv-tiny-models DIR`: writes the end-to-end tests' tiny random-weight models, one folder
//! per architecture (`DIR/llama`, `DIR/qwen2`, ...), each with a `prompt.txt` of ~600 tokens,
//! for machines that run the engine but have no Rust toolchain (the GPU device script,
//! `kernels/device-run.sh`, which `kernels/build-device.sh` prepares).

use anyhow::{Context, Result};
use freekv_integration_tests::tiny_models::{filler_text, write_tiny_model, Arch};

fn main() -> Result<()> {
    let dir = std::env::args()
        .nth(1)
        .context("usage: freekv-tiny-models DIR")?;
    for (i, arch) in Arch::ALL.into_iter().enumerate() {
        let model_dir = std::path::Path::new(&dir).join(arch.name());
        // The seeds and prompts of the e2e test that compares FreeKV with stock on every arch.
        let model = write_tiny_model(arch, &model_dir, 11 + i as u64)?;
        let prompt = filler_text(100 + i as u64, 600);
        std::fs::write(model.dir.join("prompt.txt"), prompt)
            .with_context(|| format!("writing {}/prompt.txt", model.dir.display()))?;
        println!("{}", model.dir.display());
    }
    Ok(())
}
