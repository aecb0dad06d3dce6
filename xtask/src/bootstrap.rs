//! Materialises the engine crates we patch: pristine crates.io sources + the patch series in
//! `patches/<crate>/NN-name.patch` (applied in name order), unpacked into the git-ignored
//! `patched/` folder that the root workspace's `[patch.crates-io]` points at.
//!
//! Each crate folder is the work tree of a git repository kept beside it
//! (`patched/.git-<crate>`, outside the folder so cargo and the engine's build script do not
//! see it): one commit of the pristine sources (tag `pristine`), then one commit per patch
//! (subject = the patch's name, body = its reason). `save-patches` writes the series back from
//! those commits, so each patch stays a separate, upstreamable change.
//!
//! Idempotent: a stamp beside each folder holds the sha256 of the pristine `.crate` archive and
//! of every patch; a folder whose stamp matches is left alone, so cargo's fingerprints stay
//! valid and nothing is rebuilt. A patch that does not apply stops with the file and hunk that
//! failed.

use crate::util::{cargo_home, run, run_capture, sha256_file, Ctx};
use std::fs;
use std::path::{Path, PathBuf};

/// Engine crates we patch, all pinned to this version.
pub const ENGINE_VERSION: &str = "0.8.1";
pub const PATCHED_CRATES: &[&str] = &[
    "mistralrs-quant",
    "mistralrs-core",
    "mistralrs-server-core",
    "mistralrs-cli",
];

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
        let series = patch_series(ctx, name)?;
        let stamp = stamp_for(&archive, &series)?;
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
        materialise(&archive, &series, &dir, name)?;
        fs::write(stamp_path(&dir, name), format!("{stamp}\n"))
            .map_err(|e| format!("cannot write stamp in {}: {e}", dest.display()))?;
        eprintln!(
            "xtask: materialised {} ({} patches)",
            dest.display(),
            series.len()
        );
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

/// `patches/<crate>/*.patch`, in the order they apply (by name).
fn patch_series(ctx: &Ctx, name: &str) -> Result<Vec<PathBuf>, String> {
    let dir = ctx.root.join("patches").join(name);
    let Ok(entries) = fs::read_dir(&dir) else {
        return Ok(Vec::new());
    };
    let mut series: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "patch"))
        .collect();
    series.sort();
    Ok(series)
}

fn stamp_for(archive: &Path, series: &[PathBuf]) -> Result<String, String> {
    let mut stamp = format!("crate={}", sha256_file(archive)?);
    for patch in series {
        let name = patch.file_name().unwrap_or_default().to_string_lossy();
        stamp += &format!(" {name}={}", sha256_file(patch)?);
    }
    Ok(stamp)
}

/// The series repository of a crate folder (kept outside it).
fn git_dir(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!(".git-{name}"))
}

/// A git command on the series repository of `name`, with a fixed identity (CI has none).
fn git(dir: &Path, name: &str) -> std::process::Command {
    let tree = dir.join(format!("{name}-{ENGINE_VERSION}"));
    let mut cmd = std::process::Command::new("git");
    // From inside the tree: `git apply` takes paths relative to the current directory.
    cmd.current_dir(&tree)
        .arg("--git-dir")
        .arg(git_dir(dir, name))
        .arg("--work-tree")
        .arg(&tree)
        .args([
            "-c",
            "user.name=xtask",
            "-c",
            "user.email=xtask@localhost",
            "-c",
            "commit.gpgsign=false",
            "-c",
            "core.autocrlf=false",
        ]);
    cmd
}

/// Runs a git command, returning its stdout; an error carries its stderr.
fn git_run(cmd: &mut std::process::Command) -> Result<String, String> {
    let out = run_capture(cmd)?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{} failed: {}",
            crate::util::describe(cmd),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A patch file: its reason (the text before the first `diff --git`) and the diff.
fn split_patch(text: &str) -> (&str, &str) {
    let at = if text.starts_with("diff --git ") {
        0
    } else {
        text.find("\ndiff --git ").map_or(text.len(), |i| i + 1)
    };
    (text[..at].trim(), &text[at..])
}

fn materialise(archive: &Path, series: &[PathBuf], dir: &Path, name: &str) -> Result<(), String> {
    let dest = dir.join(format!("{name}-{ENGINE_VERSION}"));
    let repo = git_dir(dir, name);
    for old in [&dest, &repo] {
        if old.exists() {
            fs::remove_dir_all(old).map_err(|e| format!("cannot remove {}: {e}", old.display()))?;
        }
    }
    run(std::process::Command::new("tar")
        .arg("-xzf")
        .arg(archive)
        .arg("-C")
        .arg(dir))?;
    let result = (|| {
        git_run(git(dir, name).args(["init", "--quiet", "--initial-branch=series"]))?;
        git_run(git(dir, name).args(["add", "--all"]))?;
        git_run(git(dir, name).args(["commit", "--quiet", "-m", "pristine"]))?;
        git_run(git(dir, name).args(["tag", "pristine"]))?;
        for patch in series {
            apply_patch(dir, name, patch)?;
        }
        Ok(())
    })();
    if result.is_err() {
        // Leave no half-patched tree behind: the next run starts from the archive again.
        let _ = fs::remove_dir_all(&dest);
        let _ = fs::remove_dir_all(&repo);
    }
    result
}

/// Applies one patch of the series with `git apply` (which names the file and the hunk that
/// failed) and commits it.
fn apply_patch(dir: &Path, name: &str, patch: &Path) -> Result<(), String> {
    let out = run_capture(
        git(dir, name)
            .args(["apply", "--verbose", "--whitespace=nowarn"])
            .arg(patch),
    )?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let failing: Vec<&str> = stderr
            .lines()
            .filter(|l| l.starts_with("error:") || l.contains("patch failed"))
            .collect();
        return Err(format!(
            "patch {} does not apply to the sources of {name} {ENGINE_VERSION} (pristine + the \
             patches before it):\n  {}\n(the engine's sources changed, or the patch was edited \
             by hand; regenerate the series with `cargo xtask save-patches` from `patched/`)",
            patch.display(),
            failing.join("\n  ")
        ));
    }
    let text = fs::read_to_string(patch).map_err(|e| format!("{}: {e}", patch.display()))?;
    let (reason, _) = split_patch(&text);
    let subject = patch.file_stem().unwrap_or_default().to_string_lossy();
    git_run(git(dir, name).args(["add", "--all"]))?;
    git_run(
        git(dir, name)
            .args(["commit", "--quiet", "--allow-empty", "-m"])
            .arg(subject.as_ref())
            .arg("-m")
            .arg(if reason.is_empty() { "-" } else { reason }),
    )?;
    Ok(())
}

/// Writes `patches/<crate>/*.patch` from the series repositories in `patched/`: one file per
/// commit after `pristine`, named by its subject, its body as the reason. Uncommitted edits
/// must first go into a patch: `into` (`<crate>/<NN-name>`) folds them into that patch (a new
/// name appends a new patch, with `reason` as its reason); without it they are refused.
pub fn save_patches(ctx: &Ctx, into: Option<&str>, reason: Option<&str>) -> Result<(), String> {
    let dir = ctx.root.join("patched");
    if let Some(target) = into {
        let (krate, patch) = target
            .split_once('/')
            .filter(|(k, _)| PATCHED_CRATES.contains(k))
            .ok_or_else(|| {
                format!("--into takes <crate>/<NN-name>, the crate one of {PATCHED_CRATES:?}")
            })?;
        fold_edits(&dir, krate, patch.trim_end_matches(".patch"), reason)?;
    }
    for name in PATCHED_CRATES {
        if !git_dir(&dir, name).is_dir() {
            return Err(format!(
                "{} has no series repository (run `cargo xtask bootstrap`)",
                dir.join(format!("{name}-{ENGINE_VERSION}")).display()
            ));
        }
        let dirty = git_run(git(&dir, name).args(["status", "--porcelain"]))?;
        if !dirty.trim().is_empty() {
            let series = git_run(git(&dir, name).args(["log", "--format=%s", "pristine..HEAD"]))?;
            return Err(format!(
                "patched/{name}-{ENGINE_VERSION} has edits in no patch:\n{}\nsay which patch \
                 they belong to: `cargo xtask save-patches --into {name}/<NN-name>` (one of: {}; \
                 a new name adds a patch, with --reason \"...\")",
                dirty.trim_end(),
                series
                    .split_whitespace()
                    .rev()
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        write_series(ctx, &dir, name)?;
    }
    Ok(())
}

/// Commits the uncommitted edits of crate `name` into the patch `patch` (a fixup squashed
/// into it, or a new patch at the end of the series).
fn fold_edits(dir: &Path, name: &str, patch: &str, reason: Option<&str>) -> Result<(), String> {
    git_run(git(dir, name).args(["add", "--all"]))?;
    let log = git_run(git(dir, name).args(["log", "--format=%H %s", "pristine..HEAD"]))?;
    let existing = log
        .lines()
        .filter_map(|l| l.split_once(' '))
        .find(|(_, subject)| *subject == patch)
        .map(|(sha, _)| sha.to_string());
    match existing {
        Some(sha) => {
            git_run(git(dir, name).args(["commit", "--quiet", "--fixup", &sha]))?;
            git_run(git(dir, name).env("GIT_SEQUENCE_EDITOR", "true").args([
                "rebase",
                "--quiet",
                "-i",
                "--autosquash",
                "pristine",
            ]))
            .map_err(|e| {
                format!(
                    "{e}\n(the edit conflicts with a later patch: resolve it with `git \
                     --git-dir patched/.git-{name} --work-tree patched/{name}-{ENGINE_VERSION} \
                     rebase --continue`, then run save-patches again)"
                )
            })?;
        }
        None => {
            let reason = reason.ok_or_else(|| {
                format!("{name}/{patch} is a new patch: give its reason with --reason \"...\"")
            })?;
            git_run(
                git(dir, name)
                    .args(["commit", "--quiet", "-m", patch, "-m"])
                    .arg(reason),
            )?;
        }
    }
    Ok(())
}

/// Rewrites `patches/<name>/` from the commits after `pristine` and refreshes the stamp.
fn write_series(ctx: &Ctx, dir: &Path, name: &str) -> Result<(), String> {
    let out_dir = ctx.root.join("patches").join(name);
    fs::create_dir_all(&out_dir).map_err(|e| format!("{}: {e}", out_dir.display()))?;
    let commits = git_run(git(dir, name).args(["rev-list", "--reverse", "pristine..HEAD"]))?;
    let mut written = Vec::new();
    for sha in commits.split_whitespace() {
        let subject = git_run(git(dir, name).args(["log", "-1", "--format=%s", sha]))?;
        let body = git_run(git(dir, name).args(["log", "-1", "--format=%b", sha]))?;
        let diff = git_run(git(dir, name).args([
            "diff",
            "--no-color",
            "--no-ext-diff",
            "--full-index",
            &format!("{sha}^"),
            sha,
        ]))?;
        let body = body.trim();
        let text = if body.is_empty() || body == "-" {
            diff
        } else {
            format!("{body}\n\n{diff}")
        };
        let file = out_dir.join(format!("{}.patch", subject.trim()));
        if fs::read_to_string(&file).ok().as_deref() != Some(text.as_str()) {
            fs::write(&file, text).map_err(|e| format!("{}: {e}", file.display()))?;
            eprintln!("xtask: wrote {}", file.display());
        }
        written.push(file);
    }
    for old in patch_series(ctx, name)? {
        if !written.contains(&old) {
            fs::remove_file(&old).map_err(|e| format!("{}: {e}", old.display()))?;
            eprintln!("xtask: removed {}", old.display());
        }
    }
    let stamp = stamp_for(&crate_archive(name)?, &patch_series(ctx, name)?)?;
    fs::write(stamp_path(dir, name), format!("{stamp}\n")).map_err(|e| e.to_string())
}
