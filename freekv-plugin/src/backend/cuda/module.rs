//! Compiled kernels loaded into a device's context, cached per (context, configuration).
//!
//! Each file is compiled by [`super::nvrtc::compile_image`] (cached per architecture) to a cubin
//! for the device's architecture, which loads without the driver's JIT; when the cubin cannot be
//! made or loaded, the PTX is tried (and the fallback logged). Each context loads each file's
//! module once. Loading happens at backend construction, never on the decode path.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{sys, CudaContext, CudaFunction, CudaModule};
use cudarc::nvrtc::Ptx;
use once_cell::sync::Lazy;

use super::nvrtc;
use super::source::{ComputeCap, Image, KernelConfig, KernelFile};

/// The functions of one kernel configuration on one context.
pub struct LoadedKernels {
    /// The configuration the kernels were compiled for.
    pub config: KernelConfig,
    /// The compute capability the kernels were compiled for (the context's device).
    pub arch: ComputeCap,
    /// What each kernel file was loaded from (a cubin, or PTX after the cubin failed).
    pub images: Vec<(KernelFile, Image)>,
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
    let mut images = Vec::new();
    for file in KernelFile::ALL {
        let (module, image) = load_file(ctx, file, config, arch)?;
        for &name in file.kernels() {
            functions.insert(name, module.load_function(name)?);
        }
        modules.push(module);
        images.push((file, image));
    }
    let loaded = Arc::new(LoadedKernels {
        config,
        arch,
        images,
        functions,
        _modules: modules,
    });
    LOADED.lock().unwrap().insert(key, loaded.clone());
    Ok(loaded)
}

/// Loads one kernel file: its cubin, or its PTX when the cubin cannot be made or loaded (an
/// NVRTC that does not know the architecture, say); an error names both failures.
fn load_file(
    ctx: &Arc<CudaContext>,
    file: KernelFile,
    config: KernelConfig,
    arch: ComputeCap,
) -> anyhow::Result<(Arc<CudaModule>, Image)> {
    let load = |image: Image| -> anyhow::Result<Arc<CudaModule>> {
        let bytes = nvrtc::compile_image(file, config, arch, image)?;
        let ptx = match image {
            Image::Cubin => Ptx::from_binary(bytes.to_vec()),
            Image::Ptx => Ptx::from_src(String::from_utf8_lossy(&bytes).into_owned()),
        };
        ctx.load_module(ptx).map_err(|e| {
            anyhow::anyhow!(
                "loading the {image:?} of kernels/{} ({}) on {arch}: {e:?}",
                file.file_name(),
                config.tag()
            )
        })
    };
    let cubin_failure = match load(Image::Cubin) {
        Ok(module) => return Ok((module, Image::Cubin)),
        Err(e) => e,
    };
    tracing::warn!("FreeKV: {cubin_failure:#}; loading the PTX instead");
    let module = load(Image::Ptx)
        .map_err(|e| anyhow::anyhow!("{e:#} (after the cubin failed: {cubin_failure:#})"))?;
    Ok((module, Image::Ptx))
}

/// The CUDA driver's version (`cuDriverGetVersion`, e.g. 13000 for 13.0) and NVRTC's, for the
/// logs of a GPU run: PTX from an NVRTC newer than the driver does not load.
pub fn versions() -> String {
    let mut driver = 0;
    // SAFETY: cuDriverGetVersion only writes the int it is given.
    let rc = unsafe { sys::cuDriverGetVersion(&mut driver) };
    let driver = match rc {
        sys::CUresult::CUDA_SUCCESS => format!("{}.{}", driver / 1000, driver % 1000 / 10),
        other => format!("unknown ({other:?})"),
    };
    let nvrtc = match nvrtc::nvrtc_version() {
        Ok((major, minor)) => format!("{major}.{minor}"),
        Err(why) => format!("unavailable ({why})"),
    };
    format!("CUDA driver {driver}, NVRTC {nvrtc}")
}
