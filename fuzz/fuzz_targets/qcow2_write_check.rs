//! cargo-fuzz target `qcow2_write_check`: see `vmvol_fuzz::qcow2::write_check` and docs/testing.md.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmvol_fuzz::qcow2::write_check(data));
