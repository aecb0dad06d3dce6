//! Test support for FreeKV end-to-end tests.

pub mod tiny_models;
