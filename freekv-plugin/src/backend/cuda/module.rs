//! Compiled kernels loaded into a device's context, cached per (context, configuration).
//!
//! PTX comes from [`super::nvrtc::compile`] (cached per architecture); each context loads each
//! file's module once. Loading happens at backend construction, never on the decode path.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{sys, CudaContext, CudaFunction, CudaModule};
use cudarc::nvrtc::Ptx;
use once_cell::sync::Lazy;

use super::nvrtc;
use super::source::{ComputeCap, KernelConfig, KernelFile};

/// The functions of one kernel configuration on one context.
pub struct LoadedKernels {
    /// The configuration the kernels were compiled for.
    pub config: KernelConfig,
    /// The compute capability the PTX was compiled for (the context's device).
    pub arch: ComputeCap,
    functions: HashMap<&'static str, CudaFunction>,
    _modules: Vec<Arc<CudaModule>>,
}

impl LoadedKernels {
    /// The raw handle of kernel `name`; panics if no kernel file defines it.
    pub fn function(&self, name: &str) -> sys::CUfunction {
        self.functions
            .get(name)
            .unwrap_or_else(|| panic!("kernel {name} is not part of the FreeKV kernel files"))
            .cu_function()
    }
}

type Key = (usize, KernelConfig);
static LOADED: Lazy<Mutex<HashMap<Key, Arc<LoadedKernels>>>> =
    Lazy::new(|| Mutex::new(HashMap::new()));

/// The device's compute capability.
pub fn compute_cap(ctx: &Arc<CudaContext>) -> anyhow::Result<ComputeCap> {
    let (major, minor) = ctx.compute_capability()?;
    Ok(ComputeCap {
        major: major as u32,
        minor: minor as u32,
    })
}

/// Compiles (once per architecture) and loads (once per context) every kernel file for `config`.
pub fn load(ctx: &Arc<CudaContext>, config: KernelConfig) -> anyhow::Result<Arc<LoadedKernels>> {
    let key = (Arc::as_ptr(ctx) as usize, config);
    if let Some(k) = LOADED.lock().unwrap().get(&key) {
        return Ok(k.clone());
    }
    let arch = compute_cap(ctx)?;
    let mut functions = HashMap::new();
    let mut modules = Vec::new();
    for file in KernelFile::ALL {
        let ptx = nvrtc::compile(file, config, arch)?;
        let module = ctx
            .load_module(Ptx::from_src(ptx.to_string()))
            .map_err(|e| {
                anyhow::anyhow!(
                    "loading kernels/{} ({}) on {arch}: {e:?}",
                    file.file_name(),
                    config.tag()
                )
            })?;
        for &name in file.kernels() {
            functions.insert(name, module.load_function(name)?);
        }
        modules.push(module);
    }
    let loaded = Arc::new(LoadedKernels {
        config,
        arch,
        functions,
        _modules: modules,
    });
    LOADED.lock().unwrap().insert(key, loaded.clone());
    Ok(loaded)
}
