//! FreeKV core proven against brute-force references (one test binary; see the modules).
//!
//! - `reference`: naive attention, page summaries, scores, pooling, top-k (f64, plain loops);
//! - `harness`: drives `FreeKv` and the reference side by side and checks every step;
//! - `equivalence`: budget >= context equals dense, dense mode and dense layers;
//! - `retrieval`: sync = brute force, speculation uses `q_{i-1}`, correction, tau = 1;
//! - `tiers`: prefix hits, block reuse, rebuilds, freeing, errors, counters;
//! - `probe`: the selection probe on a live instance;
//! - `trace`: an insta snapshot of a small deterministic trace;
//! - `fuzz`: arbitrary knob values through parsing, validation and an instance.

mod harness;
mod reference;
mod rng;

mod equivalence;
mod fuzz;
mod probe;
mod retrieval;
mod tiers;
mod trace;
