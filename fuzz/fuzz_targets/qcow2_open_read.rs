//! cargo-fuzz target `qcow2_open_read`: see `vmvol_fuzz::qcow2::open_and_read` and docs/testing.md.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmvol_fuzz::qcow2::open_and_read(data));
