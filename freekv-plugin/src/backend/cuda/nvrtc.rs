//! Run-time compilation of the kernels with NVRTC, cached per (file, configuration, architecture,
//! image kind).
//!
//! The same functions serve the CUDA backend (which loads a cubin, or the PTX when the cubin
//! fails, into a device's context, see `module.rs`) and the CI compile check
//! (`tests/nvrtc_compile.rs`), so what CI checks is exactly what runs.

use std::collections::HashMap;
use std::ffi::{c_char, CStr, CString};
use std::sync::{Arc, Mutex};

use cudarc::nvrtc::{result, sys};
use once_cell::sync::Lazy;

use super::source::{ComputeCap, Image, KernelConfig, KernelFile};

type Key = (KernelFile, KernelConfig, ComputeCap, Image);

static CACHE: Lazy<Mutex<HashMap<Key, Arc<[u8]>>>> = Lazy::new(|| Mutex::new(HashMap::new()));

/// Compiles (or returns the cached PTX of) one kernel file for one configuration and architecture.
pub fn compile(
    file: KernelFile,
    config: KernelConfig,
    arch: ComputeCap,
) -> anyhow::Result<Arc<str>> {
    let ptx = compile_image(file, config, arch, Image::Ptx)?;
    let text = std::str::from_utf8(&ptx)
        .map_err(|e| anyhow::anyhow!("the PTX of kernels/{} is not text: {e}", file.file_name()))?;
    Ok(Arc::from(text))
}

/// Compiles (or returns the cached image of) one kernel file: the cubin's bytes, or the PTX's
/// text without its terminating NUL.
pub fn compile_image(
    file: KernelFile,
    config: KernelConfig,
    arch: ComputeCap,
    image: Image,
) -> anyhow::Result<Arc<[u8]>> {
    config.validate()?;
    let key = (file, config, arch, image);
    if let Some(bytes) = CACHE.lock().unwrap().get(&key) {
        return Ok(bytes.clone());
    }
    // Compile outside the lock: NVRTC takes ~0.1-1 s and other files may compile meanwhile.
    let options = config.nvrtc_options(arch, image);
    let failed = |what: &str| {
        anyhow::anyhow!(
            "NVRTC failed to {what} kernels/{} for {arch} ({}, {image:?}; options {options:?})",
            file.file_name(),
            config.tag()
        )
    };
    let program = Program::new(file).map_err(|e| failed(&format!("create a program ({e:?})")))?;
    if let Err(e) = program.compile(&options) {
        return Err(anyhow::anyhow!(
            "{:#}\n{}",
            failed(&format!("compile ({e:?})")),
            program.log()
        ));
    }
    let bytes = match image {
        Image::Ptx => program.ptx(),
        Image::Cubin => program.cubin(),
    }
    .map_err(|e| failed(&format!("read the {image:?} of ({e:?})")))?;
    let bytes: Arc<[u8]> = Arc::from(bytes);
    CACHE.lock().unwrap().insert(key, bytes.clone());
    Ok(bytes)
}

/// One NVRTC program, destroyed when dropped.
struct Program {
    prog: sys::nvrtcProgram,
    // NVRTC reads these while the program lives.
    _src: CString,
    _name: CString,
}

impl Program {
    fn new(file: KernelFile) -> Result<Self, result::NvrtcError> {
        let src = CString::new(file.translation_unit()).expect("kernel sources have no NUL");
        let name = CString::new(file.file_name()).expect("file names have no NUL");
        let prog = result::create_program(&src, Some(&name))?;
        Ok(Self {
            prog,
            _src: src,
            _name: name,
        })
    }

    fn compile(&self, options: &[String]) -> Result<(), result::NvrtcError> {
        // SAFETY: `prog` was created above and is destroyed only on drop.
        unsafe { result::compile_program(self.prog, options) }
    }

    /// The compiler's log (warnings and errors), or why it could not be read.
    fn log(&self) -> String {
        // SAFETY: as in `compile`; the log is NUL-terminated.
        match unsafe { result::get_program_log(self.prog) } {
            Ok(log) => unsafe { CStr::from_ptr(log.as_ptr()) }
                .to_string_lossy()
                .into_owned(),
            Err(e) => format!("(no compiler log: {e:?})"),
        }
    }

    fn ptx(&self) -> Result<Vec<u8>, result::NvrtcError> {
        // SAFETY: as in `compile`; compiled successfully before this is called.
        let text = unsafe { result::get_ptx(self.prog) }?;
        Ok(text
            .into_iter()
            .map(|c| c as u8)
            .take_while(|&b| b != 0)
            .collect())
    }

    fn cubin(&self) -> Result<Vec<u8>, result::NvrtcError> {
        let mut size = 0usize;
        // SAFETY: as in `ptx`; the buffer holds the size NVRTC reported.
        unsafe { sys::nvrtcGetCUBINSize(self.prog, &mut size) }.result()?;
        let mut bytes = vec![0u8; size];
        unsafe { sys::nvrtcGetCUBIN(self.prog, bytes.as_mut_ptr() as *mut c_char) }.result()?;
        Ok(bytes)
    }
}

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: created by `create_program`, destroyed once.
        let _ = unsafe { result::destroy_program(self.prog) };
    }
}

/// NVRTC's version, or why the library could not be loaded. In `nvrtc`-only builds cudarc opens
/// libnvrtc at first use and panics when it is missing; that panic becomes an error here.
pub fn nvrtc_version() -> Result<(i32, i32), String> {
    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let r = std::panic::catch_unwind(|| {
        let (mut major, mut minor) = (0, 0);
        // SAFETY: nvrtcVersion only writes the two ints it is given.
        let rc = unsafe { sys::nvrtcVersion(&mut major, &mut minor) };
        (rc, major, minor)
    });
    std::panic::set_hook(prev);
    match r {
        Ok((sys::nvrtcResult::NVRTC_SUCCESS, major, minor)) => Ok((major, minor)),
        Ok((rc, _, _)) => Err(format!("nvrtcVersion failed: {rc:?}")),
        Err(p) => Err(p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "libnvrtc could not be loaded".to_string())),
    }
}
