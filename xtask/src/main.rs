//! `cargo xtask <command>`: the project's one entry point (see README.md).

mod bootstrap;
mod jobs;
mod model;
mod util;

use util::Ctx;

const USAGE: &str = "usage: cargo xtask <command>

commands:
  bootstrap [--check]   materialise the patched engine crates in patched/ (idempotent)
  save-patches [--into CRATE/NN-NAME [--reason TEXT]]
                        write the patch series patches/CRATE/*.patch from patched/ (edits not yet
                        in a patch go into the one named by --into; a new name adds a patch)
  fetch-model           fetch, verify and cache the real model (SmolLM2-135M GGUF); prints its path
  demo [-- ARGS]        the main job: the passkey task through `mistralrs run` with FreeKV (CPU);
                        ARGS go to examples/passkey_cli.rs (--tokens, --depth, --budget, --compare-stock)
  test [-- ARGS]        every test (ARGS go to the test binaries, e.g. a name filter; without
                        ARGS also the evaluation's smoke run)
  eval PART.. [--quick] the evaluation on the real model: passkey, retrieval, selection,
                        needles, agreement, tuning, speed, load, batching or all;
                        writes tables, JSON and PNG plots to docs/results (see docs/results.md)
";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Err(e) = dispatch(&args) {
        eprintln!("xtask: error: {e}");
        std::process::exit(1);
    }
}

fn dispatch(args: &[String]) -> Result<(), String> {
    let ctx = Ctx::new()?;
    let rest: Vec<&str> = args.iter().skip(1).map(String::as_str).collect();
    match args.first().map(String::as_str) {
        Some("bootstrap") => bootstrap::bootstrap(&ctx, rest.contains(&"--check")),
        Some("save-patches") => {
            let value = |flag: &str| {
                rest.iter()
                    .position(|a| *a == flag)
                    .map(|i| {
                        rest.get(i + 1)
                            .copied()
                            .ok_or(format!("{flag} needs a value"))
                    })
                    .transpose()
            };
            bootstrap::save_patches(&ctx, value("--into")?, value("--reason")?)
        }
        Some("fetch-model") => {
            let path = model::fetch_smollm2(&ctx)?;
            println!("{}", path.display());
            Ok(())
        }
        Some("demo") => jobs::demo(&ctx, after_dashes(&rest)),
        Some("test") => jobs::test(&ctx, after_dashes(&rest)),
        Some("eval") => jobs::eval(&ctx, after_dashes(&rest)),
        Some("help") | Some("--help") | Some("-h") | None => {
            print!("{USAGE}");
            Ok(())
        }
        Some(other) => Err(format!("unknown command `{other}`\n{USAGE}")),
    }
}

/// The arguments after a `--` (all of them if there is none).
fn after_dashes<'a>(rest: &'a [&'a str]) -> &'a [&'a str] {
    match rest.iter().position(|a| *a == "--") {
        Some(i) => &rest[i + 1..],
        None => rest,
    }
}
