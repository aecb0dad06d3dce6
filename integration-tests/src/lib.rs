//! Test support for FreeKV's end-to-end tests: tiny random-weight models, an in-process
//! engine driver (Rust SDK), a minimal HTTP client for the server tests, real prose for long
//! prompts, and where to find the engine's CLI and the real model.

pub mod engine;
pub mod http;
pub mod load;
pub mod paths;
pub mod prose;
pub mod ring;
pub mod server;
pub mod tiny_models;

/// Heavy end-to-end tests take this lock so they run one at a time on small machines.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}
