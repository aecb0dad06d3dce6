//! Shared pieces of the example programs: the long-context workloads they run.

pub mod passkey;
