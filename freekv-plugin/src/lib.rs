//! FreeKV for mistral.rs.
