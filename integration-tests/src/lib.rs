//! Test support for FreeKV end-to-end tests.
