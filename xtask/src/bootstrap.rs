//! Materialises the engine crates we patch: pristine crates.io sources + `patches/*.patch`,
//! unpacked into the git-ignored `patched/` folder that the root workspace's
//! `[patch.crates-io]` points at.
//!
//! Idempotent: each crate folder carries a stamp (sha256 of the pristine `.crate` archive
//! and of its patch); a folder whose stamp matches is left alone, so cargo's fingerprints
//! stay valid and nothing is rebuilt. A patch that does not apply stops with the file and
//! hunk that failed.

use crate::util::{cargo_home, run, run_capture, sha256_file, Ctx};
use std::fs;
use std::path::{Path, PathBuf};

/// Engine crates we patch, all pinned to this version.
pub const ENGINE_VERSION: &str = "0.8.1";
pub const PATCHED_CRATES: &[&str] = &["mistralrs-core", "mistralrs-server-core", "mistralrs-cli"];

/// Stamps live beside the crate folders, not inside: cargo fingerprints a path crate by the
/// newest file in its folder, so a stamp written inside would rebuild the engine.
fn stamp_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!(".{name}-{ENGINE_VERSION}.stamp"))
}

pub fn bootstrap(ctx: &Ctx, check_only: bool) -> Result<(), String> {
    fetch_pristine(ctx)?;
    let dir = ctx.root.join("patched");
    fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    for name in PATCHED_CRATES {
        let archive = crate_archive(name)?;
        let patch = patch_file(ctx, name);
        let stamp = stamp_for(&archive, &patch)?;
        let dest = dir.join(format!("{name}-{ENGINE_VERSION}"));
        let current = fs::read_to_string(stamp_path(&dir, name)).unwrap_or_default();
        if current.trim() == stamp && dest.is_dir() {
            continue;
        }
        if check_only {
            return Err(format!(
                "{} is missing or stale (run `cargo xtask bootstrap`)",
                dest.display()
            ));
        }
        materialise(&archive, patch.as_deref(), &dir, &dest)?;
        fs::write(stamp_path(&dir, name), format!("{stamp}\n"))
            .map_err(|e| format!("cannot write stamp in {}: {e}", dest.display()))?;
        eprintln!("xtask: materialised {}", dest.display());
    }
    Ok(())
}

/// `cargo fetch` on a manifest that depends on the engine crates: puts the pristine archives
/// (and every dependency the build will need) into cargo's cache.
fn fetch_pristine(ctx: &Ctx) -> Result<(), String> {
    if PATCHED_CRATES.iter().all(|n| crate_archive(n).is_ok()) {
        return Ok(());
    }
    let manifest = ctx.root.join("xtask/pristine/Cargo.toml");
    run(std::process::Command::new("cargo")
        .arg("fetch")
        .arg("--manifest-path")
        .arg(&manifest))
}

/// The `.crate` archive of `name` in cargo's registry cache.
fn crate_archive(name: &str) -> Result<PathBuf, String> {
    let cache = cargo_home().join("registry/cache");
    let file = format!("{name}-{ENGINE_VERSION}.crate");
    let entries = fs::read_dir(&cache).map_err(|e| format!("{}: {e}", cache.display()))?;
    for entry in entries.flatten() {
        let candidate = entry.path().join(&file);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    Err(format!("{file} is not in {}", cache.display()))
}

fn patch_file(ctx: &Ctx, name: &str) -> Option<PathBuf> {
    let p = ctx.root.join("patches").join(format!("{name}.patch"));
    p.is_file().then_some(p)
}

fn stamp_for(archive: &Path, patch: &Option<PathBuf>) -> Result<String, String> {
    let a = sha256_file(archive)?;
    let p = match patch {
        Some(p) => sha256_file(p)?,
        None => "no-patch".to_string(),
    };
    Ok(format!("crate={a} patch={p}"))
}

fn materialise(
    archive: &Path,
    patch: Option<&Path>,
    dir: &Path,
    dest: &Path,
) -> Result<(), String> {
    if dest.exists() {
        fs::remove_dir_all(dest).map_err(|e| format!("cannot remove {}: {e}", dest.display()))?;
    }
    run(std::process::Command::new("tar")
        .arg("-xzf")
        .arg(archive)
        .arg("-C")
        .arg(dir))?;
    if let Some(patch) = patch {
        apply_patch(patch, dest)?;
    }
    Ok(())
}

/// Applies `patch` inside `dest` with `git apply`, which names the file and the hunk that
/// failed. The folder is not a git repository, so `git apply` behaves like `patch -p1`.
fn apply_patch(patch: &Path, dest: &Path) -> Result<(), String> {
    let out = run_capture(
        std::process::Command::new("git")
            .current_dir(dest)
            .args(["apply", "--verbose", "--whitespace=nowarn"])
            .arg(patch),
    )?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let failing: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("error:") || l.contains("patch failed"))
        .collect();
    // Leave no half-patched tree behind: the next run starts from the archive again.
    let _ = fs::remove_dir_all(dest);
    Err(format!(
        "patch {} does not apply to the pristine sources of {}:\n  {}\n\
         (the engine's sources changed, or the patch was edited by hand; regenerate it with \
         `cargo xtask save-patches` from an edited `patched/` tree)",
        patch.display(),
        dest.file_name().unwrap_or_default().to_string_lossy(),
        failing.join("\n  ")
    ))
}

/// Writes `patches/<crate>.patch` from the difference between the pristine archive and the
/// edited tree in `patched/`. The developer's loop: edit `patched/…`, build, then save.
pub fn save_patches(ctx: &Ctx) -> Result<(), String> {
    let scratch = std::env::temp_dir().join(format!("freekv-pristine-{}", std::process::id()));
    fs::create_dir_all(&scratch).map_err(|e| e.to_string())?;
    for name in PATCHED_CRATES {
        let dir_name = format!("{name}-{ENGINE_VERSION}");
        let archive = crate_archive(name)?;
        run(std::process::Command::new("tar")
            .arg("-xzf")
            .arg(&archive)
            .arg("-C")
            .arg(&scratch))?;
        let out = run_capture(
            std::process::Command::new("diff")
                .current_dir(ctx.root.join("patched"))
                .args(["-ruN", "--exclude", "target"])
                .arg(scratch.join(&dir_name))
                .arg(&dir_name),
        )?;
        // diff exits 1 when the trees differ; >1 is trouble.
        if out.status.code().unwrap_or(2) > 1 {
            return Err(format!(
                "diff failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let text = relabel(&String::from_utf8_lossy(&out.stdout), &scratch, &dir_name);
        let patch = ctx.root.join("patches").join(format!("{name}.patch"));
        if text.is_empty() {
            let _ = fs::remove_file(&patch);
            continue;
        }
        if fs::read_to_string(&patch).ok().as_deref() == Some(text.as_str()) {
            continue;
        }
        fs::write(&patch, text).map_err(|e| format!("{}: {e}", patch.display()))?;
        let stamp = stamp_for(&archive, &Some(patch.clone()))?;
        fs::write(
            stamp_path(&ctx.root.join("patched"), name),
            format!("{stamp}\n"),
        )
        .map_err(|e| e.to_string())?;
        eprintln!("xtask: wrote {}", patch.display());
    }
    let _ = fs::remove_dir_all(&scratch);
    Ok(())
}

/// Turns `diff -ruN` headers into `a/…`/`b/…` paths relative to the crate root, without
/// timestamps, so the patch is stable and applies with `git apply` (`-p1`).
fn relabel(diff: &str, scratch: &Path, dir_name: &str) -> String {
    let old_prefix = format!("{}/{}/", scratch.display(), dir_name);
    let new_prefix = format!("{dir_name}/");
    let mut out = String::new();
    for line in diff.lines() {
        if line.starts_with("diff -ruN ") {
            continue;
        }
        // `diff -N` marks an absent side with the epoch as its timestamp.
        if let Some(rest) = line.strip_prefix("--- ") {
            let (path, absent) = header_path(rest);
            let rel = path.strip_prefix(&old_prefix).unwrap_or(path);
            out.push_str(&if absent {
                "--- /dev/null\n".into()
            } else {
                format!("--- a/{rel}\n")
            });
        } else if let Some(rest) = line.strip_prefix("+++ ") {
            let (path, absent) = header_path(rest);
            let rel = path.strip_prefix(&new_prefix).unwrap_or(path);
            out.push_str(&if absent {
                "+++ /dev/null\n".into()
            } else {
                format!("+++ b/{rel}\n")
            });
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// Splits a `diff` file header into its path and whether that side is absent (epoch stamp).
fn header_path(rest: &str) -> (&str, bool) {
    let mut parts = rest.splitn(2, '\t');
    let path = parts.next().unwrap_or(rest);
    let absent = parts.next().is_some_and(|t| t.starts_with("1970-01-01"));
    (path, absent)
}
