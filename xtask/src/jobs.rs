//! The project's jobs: the main job (a real model through the engine's CLI with FreeKV on)
//! and the whole test suite. Both build the workspace with exactly the same cargo arguments,
//! so the engine is compiled once and every later command finds it fresh.

use std::process::Command;

use crate::bootstrap::bootstrap;
use crate::model::fetch_smollm2;
use crate::util::{run, Ctx};

/// The one release build of the workspace: the engine's CLI with FreeKV, the plugin, the
/// integration tests and the examples. Changing these arguments (or building a subset with
/// other arguments) can change cargo's feature unification and rebuild the engine.
const BUILD: &[&str] = &[
    "--release",
    "--workspace",
    "--features",
    "mistralrs-cli/freekv",
];

fn cargo(ctx: &Ctx, subcommand: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(&ctx.root)
        .arg(subcommand)
        .args(BUILD)
        .args(args);
    // `cargo xtask` runs us through `cargo run`, which sets the package variables of *xtask*.
    // Some build scripts (ring's, among others) declare `rerun-if-env-changed` on them, so a
    // build from here would not reuse (and would overwrite) one made by a plain `cargo build`
    // in a shell, rebuilding the engine each time one alternates. Build with a shell's env.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        let set_by_cargo_run = key.starts_with("CARGO_PKG_")
            || matches!(
                key.as_ref(),
                "CARGO_MANIFEST_DIR"
                    | "CARGO_MANIFEST_PATH"
                    | "CARGO_MANIFEST_LINKS"
                    | "CARGO_CRATE_NAME"
                    | "CARGO_BIN_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
            );
        if set_by_cargo_run {
            cmd.env_remove(key.as_ref());
        }
    }
    cmd
}

/// Bootstrap, fetch the real model, build everything once.
fn prepare(ctx: &Ctx) -> Result<std::path::PathBuf, String> {
    bootstrap(ctx, false)?;
    let model = fetch_smollm2(ctx)?;
    eprintln!("xtask: building the workspace (the engine alone takes ~15-20 minutes cold)");
    run(&mut cargo(ctx, "build", &["--all-targets"]))?;
    Ok(model)
}

/// README command one: the passkey demo through `mistralrs run` with FreeKV on, on CPU.
pub fn demo(ctx: &Ctx, extra: &[&str]) -> Result<(), String> {
    let model = prepare(ctx)?;
    let bin = ctx.root.join("target/release/mistralrs");
    run(
        Command::new(ctx.root.join("target/release/examples/passkey_cli"))
            .current_dir(&ctx.root)
            .arg("--mistralrs")
            .arg(&bin)
            .arg("--gguf")
            .arg(&model)
            .args(extra),
    )
}

/// The evaluation (`freekv-eval`, integration-tests/src/bin/freekv-eval): accuracy and speed
/// of FreeKV vs dense on the real model. `args` go to the tool (parts, `--quick`, `--out`).
pub fn eval(ctx: &Ctx, args: &[&str]) -> Result<(), String> {
    let model = prepare(ctx)?;
    run(eval_command(ctx, &model).args(args))
}

fn eval_command(ctx: &Ctx, model: &std::path::Path) -> Command {
    let mut cmd = Command::new(ctx.root.join("target/release/freekv-eval"));
    cmd.current_dir(&ctx.root)
        .arg("--gguf")
        .arg(model)
        .arg("--mistralrs")
        .arg(ctx.root.join("target/release/mistralrs"));
    cmd
}

/// README command two: every test.
pub fn test(ctx: &Ctx, extra: &[&str]) -> Result<(), String> {
    let model = prepare(ctx)?;
    let mut cmd = cargo(ctx, "test", &["--lib", "--bins", "--tests"]);
    cmd.env("FREEKV_SMOLLM2_GGUF", &model).env(
        "FREEKV_MISTRALRS_BIN",
        ctx.root.join("target/release/mistralrs"),
    );
    if !extra.is_empty() {
        cmd.arg("--").args(extra);
    }
    run(&mut cmd)?;
    if extra.is_empty() {
        eprintln!("xtask: evaluation smoke run (freekv-eval all --quick)");
        run(eval_command(ctx, &model).args(["all", "--quick", "--out", "target/eval-smoke"]))?;
    }
    eprintln!("xtask: the GPU device script, dry-run on the CPU (kernels/device-run.sh)");
    run(Command::new("bash")
        .current_dir(&ctx.root)
        .arg("kernels/device-run.sh")
        .env("DEVICE_RUN_DRY", "1")
        .env("DEVICE_BIN", ctx.root.join("target/release"))
        .env("OUT", ctx.root.join("target/device-run-dry")))?;
    eprintln!(
        "xtask: CUDA path: compile every kernel (sm_80, sm_90) and type-check the Rust CUDA code"
    );
    run(Command::new("bash")
        .current_dir(&ctx.root)
        .arg("kernels/check.sh"))?;
    run(Command::new("cargo").current_dir(&ctx.root).args([
        "fmt",
        "--check",
        "-p",
        "freekv-plugin",
        "-p",
        "freekv-integration-tests",
        "-p",
        "freekv-examples",
    ]))?;
    eprintln!("xtask: all tests passed");
    Ok(())
}
