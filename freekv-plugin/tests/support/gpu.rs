//! How the GPU tests treat a machine without a usable CUDA device.

/// Says why `test` is skipped, or fails it under `FREEKV_REQUIRE_CUDA=1` (as the device script
/// runs the GPU tests: there a skip would hide that CUDA never ran).
pub fn skip(test: &str, why: &str) {
    if std::env::var("FREEKV_REQUIRE_CUDA").as_deref() == Ok("1") {
        panic!("{test} needs the GPU (FREEKV_REQUIRE_CUDA=1): {why}");
    }
    eprintln!("SKIPPED {test}: {why}");
}
