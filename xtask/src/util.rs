//! Small process and file helpers shared by the subcommands.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Where the repository is, and how the subcommands were asked to behave.
pub struct Ctx {
    pub root: PathBuf,
}

impl Ctx {
    pub fn new() -> Result<Self, String> {
        // xtask/Cargo.toml lives one level below the repository root.
        let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let root = manifest_dir
            .parent()
            .ok_or("xtask has no parent directory")?
            .to_path_buf();
        Ok(Self { root })
    }
}

pub fn cargo_home() -> PathBuf {
    if let Some(h) = std::env::var_os("CARGO_HOME") {
        return PathBuf::from(h);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cargo")
}

/// Runs a command with inherited stdio; an error names the command and its exit status.
pub fn run(cmd: &mut Command) -> Result<(), String> {
    let status = cmd
        .status()
        .map_err(|e| format!("cannot start {}: {e}", describe(cmd)))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{} failed ({status})", describe(cmd)))
    }
}

/// Runs a command and captures its output; only a failure to start is an error.
pub fn run_capture(cmd: &mut Command) -> Result<Output, String> {
    cmd.output()
        .map_err(|e| format!("cannot start {}: {e}", describe(cmd)))
}

pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// sha256 of a file, through coreutils' `sha256sum`.
pub fn sha256_file(path: &Path) -> Result<String, String> {
    let out = run_capture(Command::new("sha256sum").arg(path))?;
    if !out.status.success() {
        return Err(format!("sha256sum {} failed", path.display()));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .next()
        .map(str::to_string)
        .ok_or_else(|| format!("sha256sum printed nothing for {}", path.display()))
}
