//! Compiles every FreeKV kernel file for sm_80 and sm_90 through the same NVRTC path the CUDA
//! backend uses at run time, for every configuration of `source::ci_matrix()`. Needs libnvrtc (no
//! GPU, no driver): `kernels/check.sh` installs it and sets FREEKV_REQUIRE_NVRTC=1 so that a
//! missing library fails instead of skipping. With FREEKV_PTX_OUT set, the PTX is written there
//! (check.sh then assembles it with ptxas for the register and spill report).

use freekv_plugin::cuda::nvrtc::{compile, compile_image, nvrtc_version};
use freekv_plugin::cuda::source::{ci_matrix, ComputeCap, Image, KernelFile};

#[test]
fn every_kernel_compiles_for_sm80_and_sm90() {
    let version = match nvrtc_version() {
        Ok(v) => v,
        Err(why) => {
            if std::env::var("FREEKV_REQUIRE_NVRTC").as_deref() == Ok("1") {
                panic!(
                    "libnvrtc is required (FREEKV_REQUIRE_NVRTC=1) but could not be loaded: {why}"
                );
            }
            eprintln!(
                "SKIPPED: libnvrtc could not be loaded ({why}); run kernels/check.sh to install it"
            );
            return;
        }
    };
    eprintln!("NVRTC {}.{}", version.0, version.1);
    let out = std::env::var_os("FREEKV_PTX_OUT").map(std::path::PathBuf::from);
    if let Some(dir) = &out {
        std::fs::create_dir_all(dir).unwrap();
    }
    // Two threads: CI has two cores, and NVRTC is single-threaded per program.
    let jobs: Vec<_> = [ComputeCap::SM80, ComputeCap::SM90]
        .into_iter()
        .flat_map(|arch| ci_matrix().into_iter().map(move |cfg| (arch, cfg)))
        .flat_map(|(arch, cfg)| KernelFile::ALL.into_iter().map(move |f| (arch, cfg, f)))
        .collect();
    let n = jobs.len();
    let t0 = std::time::Instant::now();
    let failures: Vec<String> = std::thread::scope(|scope| {
        let halves: Vec<_> = jobs.chunks(n.div_ceil(2)).collect();
        let handles: Vec<_> = halves
            .into_iter()
            .map(|part| {
                let out = out.clone();
                scope.spawn(move || {
                    let mut failures = Vec::new();
                    for &(arch, cfg, file) in part {
                        match compile(file, cfg, arch) {
                            Ok(ptx) => {
                                for k in file.kernels() {
                                    if !ptx.contains(&format!(".entry {k}(")) {
                                        failures.push(format!(
                                            "{} {} {arch}: kernel {k} missing from PTX",
                                            file.file_name(),
                                            cfg.tag()
                                        ));
                                    }
                                }
                                if let Some(dir) = &out {
                                    let stem = file.file_name().trim_end_matches(".cu");
                                    let path = dir.join(format!("{stem}-{}-{arch}.ptx", cfg.tag()));
                                    std::fs::write(path, ptx.as_bytes()).unwrap();
                                }
                            }
                            Err(e) => failures.push(format!("{e:#}")),
                        }
                        // The backend loads the cubin of the device's architecture first: make
                        // the one of the GPUs we run on (an ELF file).
                        if arch == ComputeCap::SM90 {
                            match compile_image(file, cfg, arch, Image::Cubin) {
                                Ok(bin) if bin.starts_with(b"\x7fELF") => {}
                                Ok(bin) => failures.push(format!(
                                    "{} {} {arch}: the cubin ({} bytes) is not an ELF file",
                                    file.file_name(),
                                    cfg.tag(),
                                    bin.len()
                                )),
                                Err(e) => failures.push(format!("{e:#}")),
                            }
                        }
                    }
                    failures
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    eprintln!(
        "compiled {n} translation units in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    assert!(
        failures.is_empty(),
        "{} of {n} failed:\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}
