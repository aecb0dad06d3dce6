//! `cargo xtask <command>`: the project's one entry point (see README.md).

mod bootstrap;
mod model;
mod util;

use util::Ctx;

const USAGE: &str = "usage: cargo xtask <command>

commands:
  bootstrap [--check]   materialise the patched engine crates in patched/ (idempotent)
  save-patches          write patches/*.patch from the edited trees in patched/
  fetch-model           fetch, verify and cache the real model (SmolLM2-135M GGUF); prints its path
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
        Some("save-patches") => bootstrap::save_patches(&ctx),
        Some("fetch-model") => {
            let path = model::fetch_smollm2(&ctx)?;
            println!("{}", path.display());
            Ok(())
        }
        Some("help") | Some("--help") | Some("-h") | None => {
            print!("{USAGE}");
            Ok(())
        }
        Some(other) => Err(format!("unknown command `{other}`\n{USAGE}")),
    }
}
