//! End-to-end tests: the engine with FreeKV, in-process (Rust SDK), through its CLI and its
//! OpenAI-compatible server. One test binary (each links the whole engine); heavy tests take
//! `freekv_integration_tests::serial()` so they run one at a time.

// The `serial()` guard is held for a whole test on purpose, awaits included: each test has
// its own runtime, and the guard only keeps other tests' engines off the cores meanwhile.
#![allow(clippy::await_holding_lock)]

mod bad_input;
mod load;
mod ring;
mod server;
mod smollm2;
mod tiny;
