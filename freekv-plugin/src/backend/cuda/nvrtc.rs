//! Run-time compilation of the kernels with NVRTC, cached per (file, configuration, architecture).
//!
//! The same function serves the CUDA backend (which loads the PTX into a device's context, see
//! `module.rs`) and the CI compile check (`tests/nvrtc_compile.rs`), so what CI checks is exactly
//! what runs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use once_cell::sync::Lazy;

use super::source::{ComputeCap, KernelConfig, KernelFile};

type Key = (KernelFile, KernelConfig, ComputeCap);

static PTX_CACHE: Lazy<Mutex<HashMap<Key, Arc<str>>>> = Lazy::new(|| Mutex::new(HashMap::new()));

/// Compiles (or returns the cached PTX of) one kernel file for one configuration and architecture.
pub fn compile(
    file: KernelFile,
    config: KernelConfig,
    arch: ComputeCap,
) -> anyhow::Result<Arc<str>> {
    config.validate()?;
    let key = (file, config, arch);
    if let Some(ptx) = PTX_CACHE.lock().unwrap().get(&key) {
        return Ok(ptx.clone());
    }
    // Compile outside the lock: NVRTC takes ~0.1-1 s and other files may compile meanwhile.
    let opts = cudarc::nvrtc::CompileOptions {
        options: config.nvrtc_options(arch),
        name: Some(file.file_name().to_string()),
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(file.translation_unit(), opts).map_err(|e| {
        let detail = match &e {
            cudarc::nvrtc::CompileError::CompileError { log, options, .. } => {
                format!("options {options:?}\n{}", log.to_string_lossy())
            }
            other => format!("{other:?}"),
        };
        anyhow::anyhow!(
            "NVRTC failed to compile kernels/{} for {} ({}): {detail}",
            file.file_name(),
            arch,
            config.tag()
        )
    })?;
    let ptx: Arc<str> = Arc::from(ptx.to_src());
    PTX_CACHE.lock().unwrap().insert(key, ptx.clone());
    Ok(ptx)
}

/// NVRTC's version, or why the library could not be loaded. In `nvrtc`-only builds cudarc opens
/// libnvrtc at first use and panics when it is missing; that panic becomes an error here.
pub fn nvrtc_version() -> Result<(i32, i32), String> {
    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let r = std::panic::catch_unwind(|| {
        let (mut major, mut minor) = (0, 0);
        // SAFETY: nvrtcVersion only writes the two ints it is given.
        let rc = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
        (rc, major, minor)
    });
    std::panic::set_hook(prev);
    match r {
        Ok((cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS, major, minor)) => Ok((major, minor)),
        Ok((rc, _, _)) => Err(format!("nvrtcVersion failed: {rc:?}")),
        Err(p) => Err(p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "libnvrtc could not be loaded".to_string())),
    }
}
